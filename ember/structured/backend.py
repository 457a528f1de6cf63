"""The grammar backend (xgrammar): compiles a `StructuredOutputSpec` into a token-level grammar for
one tokenizer, caches compiled grammars by spec, and hands out one `RequestMatcher` per sequence.

A matcher follows its sequence token by token: `fill_bitmask` writes the next-token mask into one
row of the batch bitmask, `accept` advances it with the sampled token, `rollback` undoes tokens
that speculation rejected. With `reasoning` on, the matcher first lets the model think freely and
starts constraining only after the model closes `</think>`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Sequence

import torch

from ember.errors import InvalidRequestError
from ember.structured.spec import StructuredOutputSpec, choice_to_ebnf, xgrammar_error_message

logger = logging.getLogger(__name__)

THINK_END = "</think>"
_MAX_CACHED_GRAMMARS = 256


class GrammarBackend:
    """One per engine. `vocab_size` is the model's logits width (it may exceed len(tokenizer): the
    extra ids are never allowed by a grammar). `stop_token_ids`: the engine's EOS ids, the only
    tokens allowed once a grammar is complete."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 max_threads: int = 2, think_end: str = THINK_END):
        import xgrammar as xgr

        self.vocab_size = int(vocab_size)
        stop = sorted(int(t) for t in stop_token_ids) if stop_token_ids else None
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                                 stop_token_ids=stop)
        self.stop_token_ids = list(self.tokenizer_info.stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads)
        self._cache: OrderedDict[tuple, object] = OrderedDict()  # spec.cache_key -> xgr.CompiledGrammar
        self._lock = threading.Lock()  # the server compiles on worker threads (warm_grammar)
        self.num_compiles = 0  # grammars actually compiled (cache misses), for tests and metrics
        self.think_end = think_end
        self.think_end_token_id = _single_token_id(tokenizer, think_end)
        self._decoded_vocab: list[bytes] | None = None  # lazily: only reasoning requests need it

    @property
    def decoded_vocab(self) -> list[bytes]:
        if self._decoded_vocab is None:
            self._decoded_vocab = list(self.tokenizer_info.decoded_vocab)
        return self._decoded_vocab

    def compile(self, spec: StructuredOutputSpec):
        """The compiled grammar for `spec`, from the cache when an equal spec was compiled before."""
        key = spec.cache_key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            compiled = self._compile(spec)
        except InvalidRequestError:
            raise
        except Exception as e:  # xgrammar: RuntimeError / ValueError carrying the parser's message
            param = "response_format" if spec.kind in ("json_schema", "json_object") else spec.kind
            raise InvalidRequestError(f"The {spec.kind.replace('_', ' ')} could not be compiled: "
                                      f"{xgrammar_error_message(e)}.", param=param) from None
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = compiled
            while len(self._cache) > _MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputSpec):
        c = self.compiler
        if spec.json_schema is not None:
            # Compact JSON (no free whitespace): a small model cannot loop on newlines, and strict mode
            # makes unlisted properties impossible rather than merely allowed.
            return c.compile_json_schema(spec.json_schema, any_whitespace=False, strict_mode=True)
        if spec.json_object:
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.grammar is not None:
            return c.compile_grammar(spec.grammar)
        return c.compile_grammar(choice_to_ebnf(spec.choice))

    def new_matcher(self, spec: StructuredOutputSpec) -> "RequestMatcher":
        return RequestMatcher(self, self.compile(spec), reasoning=spec.reasoning)


class RequestMatcher:
    """The grammar state of one sequence. Not thread-safe; the engine thread owns it."""

    def __init__(self, backend: GrammarBackend, compiled, reasoning: bool = False):
        import xgrammar as xgr

        self._backend = backend
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = backend.vocab_size
        self.is_reasoning = reasoning  # True until the model closes </think>
        self._reasoning_ids: list[int] = []  # tokens accepted while reasoning (for rollback)
        self._num_grammar_tokens = 0  # tokens the xgrammar matcher accepted
        self._reasoning_end = 0  # len(_reasoning_ids) when </think> closed (valid once not reasoning)
        self._has_reasoning = reasoning

    # ---- advancing --------------------------------------------------------------------------------
    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar refuses it (the state is unchanged)."""
        token_id = int(token_id)
        if self.is_reasoning:
            self._reasoning_ids.append(token_id)
            if self._closes_reasoning():
                self.is_reasoning = False
                self._reasoning_end = len(self._reasoning_ids)
            return True
        if not 0 <= token_id < self.vocab_size or not self._matcher.accept_token(token_id):
            return False
        self._num_grammar_tokens += 1
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (drafts that verification rejected)."""
        if not 0 <= num_tokens <= self.num_accepted_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens; {self.num_accepted_tokens} were accepted")
        g = min(num_tokens, self._num_grammar_tokens)
        if g:
            self._matcher.rollback(g)
            self._num_grammar_tokens -= g
        rest = num_tokens - g
        if rest:
            del self._reasoning_ids[len(self._reasoning_ids) - rest:]
            if self._has_reasoning and len(self._reasoning_ids) < self._reasoning_end:
                self.is_reasoning = True
                self._reasoning_end = 0

    def _closes_reasoning(self) -> bool:
        b = self._backend
        last = self._reasoning_ids[-1]
        if b.think_end_token_id is not None and last == b.think_end_token_id:
            return True
        marker = b.think_end.encode()
        vocab = b.decoded_vocab
        tail = self._reasoning_ids[-len(marker):]  # every token is at least one byte
        return marker in b"".join(vocab[t] for t in tail if 0 <= t < len(vocab))

    # ---- masking ----------------------------------------------------------------------------------
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into `bitmask[row]` ([N, ceil(V/32)] int32, CPU). Returns False
        (and allows everything) while reasoning: the row then needs no masking."""
        if self.is_reasoning:
            bitmask[row].fill_(-1)
            return False
        if self._matcher.is_terminated():  # xgrammar refuses to mask after the stop token: stop again
            bitmask[row].zero_()
            for t in self._backend.stop_token_ids:
                word, bit = divmod(t, 32)
                bitmask[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)
            return True
        self._matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the sequence must end."""
        return not self.is_reasoning and self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The grammar is complete (only stop tokens are allowed next)."""
        return not self.is_reasoning and self._matcher.is_completed()

    @property
    def num_accepted_tokens(self) -> int:
        return len(self._reasoning_ids) + self._num_grammar_tokens


def _single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer has it as one token (Qwen3's </think>), else None."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except Exception:
        return None
    return int(ids[0]) if len(ids) == 1 else None
