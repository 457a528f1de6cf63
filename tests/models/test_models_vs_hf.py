"""Our models vs transformers on tiny random checkpoints: prefill logits (fp32, bf16) and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from models_support import VARIANTS, load_hf, load_ours

NAMES = list(VARIANTS)


def _prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_fp32(name, checkpoints, paged_session):
    prompt = _prompt(21)
    hf = load_hf(checkpoints[name], torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    ours = load_ours(checkpoints[name], torch.float32)
    got = paged_session(ours, torch.float32).step({0: prompt})[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    if name == "phi3_longrope":
        return  # chunks below 16 tokens use the short factors, by design (as HF does with a cache)
    # The same prompt in three chunks reads the earlier chunks back from the paged cache.
    sess = paged_session(ours, torch.float32, seed=3)
    chunks = [sess.step({0: prompt[a:b]})[0] for a, b in ((0, 7), (7, 16), (16, 21))]
    torch.testing.assert_close(torch.cat(chunks), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_logits_bf16(name, checkpoints, paged_session):
    prompt = _prompt(21)
    hf = load_hf(checkpoints[name], torch.bfloat16)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    ours = load_ours(checkpoints[name], torch.bfloat16)
    got = paged_session(ours, torch.bfloat16).step({0: prompt})[0]
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=0.03 * scale, rtol=0.03)
    # Most rows agree on the top token (ties under bf16 rounding aside).
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_hf_generate(name, checkpoints, paged_session):
    # HF's Phi3 generate recomputes the whole cache when a sequence first crosses
    # original_max_position_embeddings (16 here); start the longrope variant past it (see test below).
    prompt = _prompt(20 if name == "phi3_longrope" else 10, seed=2)
    hf = load_hf(checkpoints[name], torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    ours = load_ours(checkpoints[name], torch.float32)
    # Chunked prefill would rotate the first chunks with the short factors; longrope prefills whole.
    got = paged_session(ours, torch.float32).greedy(prompt, 32, chunk=None if name == "phi3_longrope" else 4)
    assert got == ref


def test_longrope_crossing_matches_hf_incremental(checkpoints, paged_session):
    """Crossing from short to long factors mid-generation: cached K keep their short-factor rotation,
    exactly as HF's own incremental forward does."""
    hf = load_hf(checkpoints["phi3_longrope"], torch.float32)
    ours = load_ours(checkpoints["phi3_longrope"], torch.float32)
    sess = paged_session(ours, torch.float32)
    prompt = _prompt(10, seed=4)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        torch.testing.assert_close(sess.step({0: prompt})[0], out.logits[0], atol=1e-4, rtol=1e-4)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        for n in range(len(prompt), len(prompt) + 12):  # seq_len 11..22 crosses 16
            out = hf(torch.tensor([[tok]]), past_key_values=past, position_ids=torch.tensor([[n]]), use_cache=True)
            torch.testing.assert_close(sess.step({0: [tok]})[0], out.logits[0], atol=1e-4, rtol=1e-4)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
