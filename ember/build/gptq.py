"""Calibration-aware 4-bit rounding (GPTQ, Frantar et al. 2022) for sources that are not already on a 4-bit grid.

Round-to-nearest treats every weight alone. GPTQ rounds one input column at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse of the layer's input Hessian
H = 2 X^T X (X: the layer's inputs over the calibration text), so the layer's *outputs* on that text stay as
close as they can: it minimizes ||X W^T - X Q^T|| column by column instead of ||W - Q||. Groups keep the
format's asymmetric min/max grid, chosen from the already-updated weights when each group starts.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ember.build.calibration import forward_logits
from ember.layers.quant.int4 import Int4Method

DAMPING = 0.01  # added to H's diagonal, as a share of its mean: keeps the Cholesky factorization stable
BLOCK_COLUMNS = 128  # columns rounded together before their error is pushed to the rest in one matmul


@torch.no_grad()
def collect_hessians(model, samples: list[list[int]], paths: list[str], progress: bool = True) -> dict[str, torch.Tensor]:
    """Linear path -> H = 2 X^T X / n (float32 [in, in]) over every token the Linear reads on `samples`.
    Linears that read the same input (none in ember's fused models, but any may) each get their own."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for path in paths:
        def hook(module, args, path=path):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [T, in]
            if path not in sums:
                sums[path] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                counts[path] = 0
            sums[path].addmm_(x.t(), x)
            counts[path] += x.shape[0]
        hooks.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        for ids in tqdm(samples, desc="calibrating (GPTQ)", unit="sample", disable=not progress):
            forward_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return {p: sums[p].mul_(2.0 / counts[p]) for p in sums}


@torch.no_grad()
def gptq_quantize(method: Int4Method, weight: torch.Tensor, hessian: torch.Tensor) -> dict[str, torch.Tensor]:
    """weight [out, in] -> the format's stored tensors, rounded by GPTQ against `hessian` [in, in]."""
    out_f, in_f = weight.shape
    g = method.group_size
    w = weight.float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs never seen non-zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMPING * torch.diag(h).mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    codes = torch.zeros(out_f, in_f, dtype=torch.int64)
    scale = torch.zeros(out_f, in_f // g)
    minimum = torch.zeros(out_f, in_f // g)
    block = max(g, BLOCK_COLUMNS // g * g)  # whole groups per block
    for start in range(0, in_f, block):
        end = min(start + block, in_f)
        w_blk = w[:, start:end].clone()  # [out, b]
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % g == 0:  # a new group: its grid from the weights as the earlier columns left them
                s, m = method.grid(w_blk[:, i:i + g])
                scale[:, col // g], minimum[:, col // g] = s[:, 0], m[:, 0]
            s, m = scale[:, col // g], minimum[:, col // g]
            q = torch.round((w_blk[:, i] - m) / s).clamp(0, 15)
            codes[:, col] = q.long()
            err = (w_blk[:, i] - (q * s + m)) / hinv_blk[i, i]  # [out]
            w_blk[:, i:].sub_(err[:, None] * hinv_blk[i, i:][None, :])
            err_blk[:, i] = err
        w[:, end:].sub_(err_blk @ hinv[start:end, end:])
    return method.pack(codes, scale, minimum)


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the layer's relative output error on the calibration inputs."""
    diff = (weight.float() - dequantized.float()).double()
    h = hessian.double()
    return float(torch.einsum("oi,ij,oj->", diff, h, diff) / torch.einsum("oi,ij,oj->", weight.double(), h,
                                                                          weight.double()))
