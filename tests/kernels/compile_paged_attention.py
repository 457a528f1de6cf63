"""Ahead-of-time compile of the paged-attention kernel for sm_90/sm_80 (no GPU needed: triton's bundled ptxas).

Run as a script in a process WITHOUT TRITON_INTERPRET (test_triton_compile.py does); catches what the
interpreter lets through: type errors, loop-carried types, unsupported ops, shared-memory overuse.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ember.layers.triton.paged_attention import _paged_attention_kernel as kernel

def signature(q: str, cache: str) -> dict:
    types = [f"*{q}", "*fp32", "*fp32", f"*{q}", f"*{cache}", f"*{cache}", "*i32", "*i32", "*i32", "*u8", "*i32",
             "*fp32"]
    names = kernel.arg_names
    sig = dict(zip(names, types))  # the 12 pointers come first (mask, then the tree's logical positions)
    sig.update({"scale": "fp32", "softcap": "fp32"})
    for name in kernel.arg_names[len(sig):]:
        sig.setdefault(name, "i32")
    return sig


BASE = dict(NUM_Q_PER_KV=4, G_PAD=4, BLOCK_Q=4, BLOCK_M=16, BLOCK_N=32, HEAD_DIM=128, HEAD_DIM_PAD=128,
            HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_MASK=False, HAS_KV_SCALE=False, NUM_SPLITS=1, IEEE_DOT=False,
            DOT_IN_FP32=False)
VARIANTS = [
    ("bf16", "bf16", {}),  # decode
    ("bf16", "bf16", dict(NUM_Q_PER_KV=3, BLOCK_Q=16, BLOCK_M=64, HEAD_DIM=80, HAS_WINDOW=True, HAS_SOFTCAP=True,
                          HAS_MASK=True, NUM_SPLITS=4)),  # everything on, mixed-batch tile
    ("fp16", "fp16", dict(BLOCK_Q=16, BLOCK_M=64, HEAD_DIM=64, HEAD_DIM_PAD=64)),
    ("fp32", "fp32", dict(IEEE_DOT=True, NUM_SPLITS=2)),
    ("bf16", "fp8e4nv", dict(HAS_KV_SCALE=True)),  # fp8 KV cache
]


def main(quick: bool = False) -> None:
    for arch in (90,) if quick else (90, 80):
        for q, cache, over in VARIANTS[1:2] + VARIANTS[4:] if quick else VARIANTS:
            if arch < 89 and cache == "fp8e4nv":
                continue
            consts = {**BASE, **over}
            sig = signature(q, cache)
            sig.update({n: "constexpr" for n in consts})
            src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert "cubin" in compiled.asm
            print(f"sm_{arch} q={q} cache={cache} {over}: shared {compiled.metadata.shared} B")
    print("ALL COMPILED")


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
