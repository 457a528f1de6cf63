"""Physical limits measured in the same run as a benchmark, so ratios don't depend on machine noise."""

from __future__ import annotations

import time

import torch


def copy_bandwidth_gbs(num_bytes: int = 256 << 20, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-N copy bandwidth, counting read and write (GB/s)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * num_bytes / best / 1e9


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
