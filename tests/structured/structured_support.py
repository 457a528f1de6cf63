"""Fixtures for the structured-output tests: the default model's tokenizer (offline, from the GGUF),
one GrammarBackend over it, and a random walker that plays the model: at each step it samples a
token the grammar allows, so every test exercises the real token-level masks without a model."""

import os

import pytest
import torch

from ember.checkpoint.default import default_model_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 49152  # SmolLM2's logits width
EOS = 2


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    gguf = default_model_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def backend(tokenizer):
    from ember.structured.backend import GrammarBackend

    return GrammarBackend(tokenizer, vocab_size=VOCAB, stop_token_ids=[EOS])


class RandomWalker:
    """Samples uniformly among allowed tokens; after `budget` tokens it prefers, in order: a stop token,
    tokens made only of closing characters (" } ]), one-byte tokens, anything allowed. That drives any
    grammar to completion in a bounded number of steps while exploring it randomly before."""

    def __init__(self, backend, tokenizer):
        self.backend, self.tokenizer = backend, tokenizer
        vocab = backend.decoded_vocab
        self.is_stop = torch.zeros(VOCAB, dtype=torch.bool)
        self.is_stop[backend.stop_token_ids] = True
        self.is_closer = torch.tensor([bool(b) and all(c in b'"}]' for c in b) for b in vocab] +
                                      [False] * (VOCAB - len(vocab)))
        self.is_short = torch.tensor([len(b) == 1 for b in vocab] + [False] * (VOCAB - len(vocab)))

    def allowed(self, matcher) -> torch.Tensor:
        from ember.structured.bitmask import allocate_bitmask, unpack_bitmask

        bm = allocate_bitmask(1, VOCAB)
        matcher.fill_bitmask(bm, 0)
        return unpack_bitmask(bm, VOCAB)[0]  # [V] bool

    def pick(self, allowed: torch.Tensor, step: int, budget: int, gen: torch.Generator) -> int:
        pools = [allowed]
        if step >= budget:
            pools = [allowed & self.is_stop, allowed & self.is_closer, allowed & self.is_short, allowed]
        for pool in pools:
            ids = pool.nonzero().flatten()
            if len(ids):
                return int(ids[torch.randint(len(ids), (1,), generator=gen)])
        raise AssertionError("the grammar allows no token")

    def run(self, matcher, seed: int = 0, budget: int = 24, max_tokens: int = 600) -> tuple[str, list[int]]:
        """Drive `matcher` to termination; returns (decoded text without the stop token, token ids)."""
        gen = torch.Generator().manual_seed(seed)
        ids: list[int] = []
        for step in range(max_tokens):
            tok = self.pick(self.allowed(matcher), step, budget, gen)
            assert matcher.accept(tok), f"matcher refused allowed token {tok}"
            ids.append(tok)
            if matcher.is_terminated():
                break
        assert matcher.is_terminated(), f"no termination within {max_tokens} tokens: {self.decode(ids)!r}"
        return self.decode(ids), ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t != EOS], skip_special_tokens=False)


@pytest.fixture(scope="session")
def walker(backend, tokenizer):
    return RandomWalker(backend, tokenizer)
