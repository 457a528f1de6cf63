"""The paged-attention kernel compiles to a cubin for sm_90 with the Triton compiler (no GPU needed).

The interpreter runs the kernel as numpy and lets through what the compiler rejects; this compiles the
all-features variant and the fp8-cache variant ahead of time in a child process without TRITON_INTERPRET.
Run `python tests/kernels/compile_paged_attention.py` for every variant on sm_90 and sm_80.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("compile_paged_attention.py")
    res = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2])
    assert res.returncode == 0 and "ALL COMPILED" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
