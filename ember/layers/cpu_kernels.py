"""ember's C++ CPU kernels (ember/csrc): built once per machine, loaded at first use, optional.

- `ember_cpu::int4_linear` / `int4_dequantize_t` / `int8_linear` (ember/csrc/quant_linear_cpu.cpp, used by
  ember.layers.quant.int4_native and ember.layers.cpu_pack's 8-bit LM head): 4- and 8-bit codes times
  activations in two int8 digits, with AVX-512 VNNI integer dot products.
- `ember_cpu::f32_linear` (ember/csrc/f32_linear_cpu.cpp, used by `linear`): float32 matmuls of up to 32 rows,
  the weight read once for all of them and every row computed alike (decode and speculative verification).
- `ember_cpu::bf16_linear` (ember/csrc/amx_linear_cpu.cpp, used by ember.layers.cpu_pack): bf16 matmuls of any
  number of rows on AMX tiles, the weight laid out once as AMX's B operand (CPUs with AMX only;
  `amx_available()`).
- `ember_cpu::decode_attention` / `decode_step_attention` (ember/csrc/attention_cpu.cpp, used by
  ember.layers.batched_attention and ember.layers.attention): one query token per sequence attended straight
  from the paged cache, without gathering it (a decode step's K/V write in the same call).

They are compiled with torch's cpp_extension (about 20 s, into TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions; `make` does it so no server start pays) for x86 CPUs with AVX-512 VNNI, BF16 and
VBMI (Sapphire Rapids and later, Zen 4 and later). Where the CPU lacks them or the build fails (no compiler),
`load()` says why once and returns False, and every caller keeps its torch path: these kernels make ember
faster, never required.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parents[1] / "csrc" / name
           for name in ("quant_linear_cpu.cpp", "attention_cpu.cpp", "f32_linear_cpu.cpp", "amx_linear_cpu.cpp")]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "f16c", "fma")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi",
          "-mf16c", "-mfma", "-mavx2", "-mamx-tile", "-mamx-bf16", "-fopenmp"]
F32_MAX_ROWS = 32  # float32 linears with up to this many rows use ember_cpu::f32_linear (its kMaxRows)
LOADED = False  # load() succeeded: read by code a compiled graph traces, which must not run load() itself
DISABLE_ENV = "EMBER_CPU_KERNELS"  # "0": never load them (the torch paths only; for A/B runs and debugging)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pinned `ninja` package's binary sits in the venv, which is not
    on PATH when ember runs as .venv/bin/ember without an activated venv."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason logged, where they cannot be."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("ember CPU kernels off (%s=0): torch paths only", DISABLE_ENV)
        return False
    missing = [f for f in CPU_FLAGS if f not in cpu_flags()]
    if missing:
        logger.info("ember CPU kernels: this CPU lacks %s; torch paths only", " ".join(missing))
        return False
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cpp_extension.load(name="ember_cpu_kernels", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a compile error: fall back, and say why
        logger.warning("ember CPU kernels could not be built (%s); torch paths only", str(e).splitlines()[0])
        return False

    global LOADED
    LOADED = True

    @torch.library.register_fake("ember_cpu::int4_linear")
    def _(x, codes, scale, minimum, gemm_rows):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("ember_cpu::int8_linear")
    def _(x, codes, scale):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("ember_cpu::bf16_linear")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("ember_cpu::f32_linear")
    def _(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("ember_cpu::decode_attention")
    def _(q, kv_cache, block_tables, seq_lens, scale, window):
        return torch.empty_like(q)

    return True


@functools.cache
def amx_available() -> bool:
    """The kernels are loaded and this CPU and OS let ember_cpu::bf16_linear use AMX tiles."""
    return load() and bool(torch.ops.ember_cpu.bf16_amx_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through `ember_cpu::f32_linear` for float32 on CPU with 1..F32_MAX_ROWS rows. One row costs what
    the BLAS gemv does; 8-24 rows 0.65-0.8x the BLAS call, which is what makes a float32 verification step cheap.
    Row-invariant: a row's result is the same alone or in a batch, so plain decoding and speculative verification
    compute the same logits. In a compiled graph the row count is dynamic: the op is always called and picks
    the BLAS call itself past F32_MAX_ROWS."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and weight.is_contiguous()):
        if torch.compiler.is_compiling():  # the runner loaded (or failed to load) the kernels before compiling
            if LOADED:
                return torch.ops.ember_cpu.f32_linear(x, weight, bias)
        elif 0 < x.shape[0] <= F32_MAX_ROWS and load():
            return torch.ops.ember_cpu.f32_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


if __name__ == "__main__":  # `python -m ember.layers.cpu_kernels`: build now (make does), say whether it worked
    logging.basicConfig(level=logging.INFO)
    ok = load()
    print("ember CPU kernels:", "built and loaded" if ok else "not available (torch paths will be used)")
