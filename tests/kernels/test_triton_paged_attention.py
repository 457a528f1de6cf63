"""The Triton paged-attention kernel vs a dense float64 reference and the torch backend.

Without a GPU the kernel runs under the Triton interpreter. Triton 3.9 decides at `import triton` (its own
`tl.sum`, `tl.max` are jit functions) and at each `@triton.jit` whether to interpret, from TRITON_INTERPRET,
so this module sets it before importing triton; if another test already imported triton uninterpreted, the
interpreted cases re-run in a child process. Cases are tiny: the interpreter runs every program in Python.
On a CUDA machine the same cases run compiled instead.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ember.layers.attention import TorchAttentionBackend, build_attention_metadata  # noqa: E402
from ember.layers.triton.backend import TritonAttentionBackend  # noqa: E402
from ember.layers.triton.paged_attention import IS_INTERPRETED  # noqa: E402
from ember.worker.kv_cache import allocate_kv_caches  # noqa: E402

from attention_reference import random_trees, reference_attention  # noqa: E402


def _case(query_lens, seq_lens, *, hq, hk, d, bs=16, dtype=torch.float32, window=None, softcap=None,
          tree_width=None, num_splits=None, device="cpu", seed=0, check_torch=True, kv_fp8=False):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-s // bs) for s in seq_lens) + 3
    cache_dtype = torch.float8_e4m3fn if kv_fp8 else dtype
    kv_cache = allocate_kv_caches(1, num_blocks, bs, hk, d, cache_dtype, device)[0]
    kv_scale = torch.tensor([0.02, 0.03], device=device) if kv_fp8 else None
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, full_k, full_v, qs = [], [], [], []
    for ql, sl in zip(query_lens, seq_lens):
        table = [free.pop() for _ in range(-(-sl // bs))]
        tables.append(table)
        k = torch.randn(sl, hk, d, generator=g).to(dtype)
        v = torch.randn(sl, hk, d, generator=g).to(dtype)
        if kv_fp8:  # what the cache will hold: values / scale in fp8
            k8, v8 = (k.float() / 0.02).to(cache_dtype), (v.float() / 0.03).to(cache_dtype)
        for p in range(sl - ql):  # the cached context
            kv_cache[0, table[p // bs], p % bs] = (k8 if kv_fp8 else k)[p].to(device)
            kv_cache[1, table[p // bs], p % bs] = (v8 if kv_fp8 else v)[p].to(device)
        full_k.append(k8.float() * 0.02 if kv_fp8 else k)
        full_v.append(v8.float() * 0.03 if kv_fp8 else v)
        qs.append(torch.randn(ql, hq, d, generator=g).to(dtype))
    md = build_attention_metadata(query_lens, seq_lens, tables, bs, device)
    masks = [None] * len(query_lens)
    if tree_width is not None:  # draft trees on the short sequences (longer ones stay causal)
        tree_mask, masks = random_trees(query_lens, seq_lens, tree_width, g, window)
        md.tree_mask = tree_mask.to(device)
    q = torch.cat(qs).to(device)
    k_new = torch.cat([k[-ql:] for k, ql in zip(full_k, query_lens)]).to(device=device, dtype=dtype)
    v_new = torch.cat([v[-ql:] for v, ql in zip(full_v, query_lens)]).to(device=device, dtype=dtype)
    scale = 1 / math.sqrt(d)
    torch_cache = kv_cache.clone()
    out = TritonAttentionBackend(num_splits=num_splits).forward(
        q, k_new, v_new, kv_cache, md, scale=scale, sliding_window=window, logit_softcap=softcap, kv_scale=kv_scale)
    assert out.dtype == dtype and out.shape == q.shape
    ref = torch.cat([
        reference_attention(qi, ki, vi, scale, window, softcap, masks[i])
        for i, (qi, ki, vi) in enumerate(zip(qs, full_k, full_v))
    ])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=tol)
    flat = kv_cache.view(2, -1, hk, d)  # the new K/V landed at their slots
    if kv_fp8:
        torch.testing.assert_close(flat[0, md.slot_mapping].float() * 0.02, k_new.float(), atol=2e-2, rtol=2e-2)
    else:
        assert torch.equal(flat[0, md.slot_mapping], k_new) and torch.equal(flat[1, md.slot_mapping], v_new)
    if check_torch:
        md.derived.clear()
        out_t = TorchAttentionBackend().forward(q, k_new, v_new, torch_cache, md, scale=scale,
                                                sliding_window=window, logit_softcap=softcap, kv_scale=kv_scale)
        torch.testing.assert_close(out.float(), out_t.float(), atol=tol, rtol=tol)


# One prefill from scratch, one chunk with cached context crossing block boundaries, decodes (interleaved).
MIXED = ([9, 1, 20, 1, 1], [9, 18, 37, 40, 1])
DECODE = ([1] * 4, [1, 17, 33, 50])
# Draft trees (6 and 4 new tokens) beside a decode and a causal prefill chunk longer than the mask.
SPEC = ([6, 1, 20, 4], [40, 17, 37, 22])

CASES = {
    "decode-mha-d64": dict(lens=DECODE, hq=2, hk=2, d=64),
    "decode-gqa4-d128": dict(lens=DECODE, hq=8, hk=2, d=128),
    "decode-split3": dict(lens=DECODE, hq=4, hk=1, d=64, num_splits=3),
    "mixed-gqa4-d64": dict(lens=MIXED, hq=8, hk=2, d=64),
    "mixed-mha-d128": dict(lens=MIXED, hq=2, hk=2, d=128),
    "mixed-window": dict(lens=MIXED, hq=4, hk=1, d=64, window=7),
    "decode-window-split": dict(lens=DECODE, hq=4, hk=2, d=64, window=20, num_splits=2),
    "mixed-softcap": dict(lens=MIXED, hq=4, hk=2, d=64, softcap=1.5),
    "mixed-tree-mask": dict(lens=SPEC, hq=4, hk=2, d=64, tree_width=6),
    "tree-mask-window": dict(lens=SPEC, hq=4, hk=1, d=64, tree_width=6, window=9),
    "decode-tree-mask": dict(lens=DECODE, hq=4, hk=1, d=64, tree_width=1),
    "mixed-bf16": dict(lens=MIXED, hq=4, hk=1, d=64, dtype=torch.bfloat16),
    "decode-fp16": dict(lens=DECODE, hq=4, hk=2, d=64, dtype=torch.float16),
    "mixed-fp8-kv-bf16": dict(lens=MIXED, hq=4, hk=2, d=64, dtype=torch.bfloat16, kv_fp8=True,
                              check_torch=False),  # the torch backend's fp8 write has no CPU kernel
    "mixed-group3-d80": dict(lens=MIXED, hq=6, hk=2, d=80),  # non-power-of-two group and head_dim
}


def _run(name, device):
    c = dict(CASES[name])
    query_lens, seq_lens = c.pop("lens")
    _case(query_lens, seq_lens, device=device, seed=len(name), **c)


@pytest.mark.skipif(not IS_INTERPRETED, reason="triton is not interpreting in this process")
@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_on_cpu(name):
    _run(name, "cpu")


@pytest.mark.skipif(IS_INTERPRETED or HAS_CUDA, reason="the interpreted cases run in this process")
def test_interpreted_in_child_process():
    """triton was imported before this module could set TRITON_INTERPRET=1: run the cases in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "test_interpreted_on_cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_on_cuda(name):
    _run(name, "cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_large_mixed_batch():
    """Realistic shapes compiled on the GPU: long contexts, 16 decodes beside two prefill chunks, bf16."""
    lens_q = [512, 1] + [1] * 16 + [300]
    lens_s = [512, 2000] + [37 * i + 5 for i in range(16)] + [1300]
    _case(lens_q, lens_s, hq=32, hk=8, d=128, dtype=torch.bfloat16, device="cuda", check_torch=True)
