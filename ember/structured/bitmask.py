"""The grammar mask at the sampler: the named points where structured output plugs into a step.

Per step the StructuredOutputManager (ember.structured.manager) fills one bitmask over the step's
sampled positions (`RequestMatcher.fill_bitmask` per constrained row; with speculation,
`fill_draft_bitmask` masks every verified position of one request; unconstrained rows stay all-allowed,
so constrained and free requests share one batch); the runner calls `apply_bitmask` on the logits
before sampling; the manager calls `advance` with each request's accepted tokens after the step.
`build_grammar_bitmask` is the same fill for a plain list of matchers.

The bitmask is xgrammar's: [num_rows, ceil(V / 32)] int32, bit j of row i set when token j is
allowed. It is filled on the CPU (the matchers live there) and copied to the logits' device.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ember.structured.backend import RequestMatcher


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """All-allowed bitmask. [num_rows, ceil(vocab_size / 32)] int32 on the CPU."""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def build_grammar_bitmask(matchers: Sequence[RequestMatcher | None], vocab_size: int
                          ) -> tuple[torch.Tensor, list[int]] | None:
    """One row per sampling row. Returns (bitmask [N, ceil(V/32)] int32 CPU, rows to mask), or None
    when no row is constrained this step (the common case costs one pass over a list)."""
    if all(m is None for m in matchers):
        return None
    bitmask = allocate_bitmask(len(matchers), vocab_size)
    rows = [i for i, m in enumerate(matchers) if m is not None and m.fill_bitmask(bitmask, i)]
    return (bitmask, rows) if rows else None


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | None = None) -> None:
    """Set disallowed logits of `rows` to -inf, in place. logits: [N, V] float on any device;
    bitmask: [N, ceil(V'/32)] int32 (CPU or the logits' device). Tokens past the bitmask's width
    (logits wider than the grammar's vocab) are disallowed too."""
    num_rows, vocab = logits.shape
    rows = list(range(num_rows)) if rows is None else list(rows)
    if not rows:
        return
    width = bitmask.shape[1] * 32
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and logits.is_contiguous():
        import xgrammar as xgr

        bm = bitmask if bitmask.device.type == "cpu" else bitmask.cpu()
        xgr.apply_token_bitmask_inplace(logits, bm.contiguous(), vocab_size=min(vocab, width), indices=rows)
    else:
        idx = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True).index_select(0, idx), vocab)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return
    if vocab > width:
        logits[rows, width:] = float("-inf")


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab_size] bool (True: allowed); ids past W * 32 are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    allowed = bits.flatten(1).bool()  # [R, W * 32]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(allowed.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def advance(matcher: RequestMatcher, token_ids: Sequence[int]) -> bool:
    """Feed the tokens a step accepted for one request. Returns True when the request must finish:
    the grammar terminated (a stop token after a complete output), or a token was refused (only
    possible when something masked every allowed token; finishing beats emitting invalid output)."""
    for t in token_ids:
        if matcher.is_terminated():
            return True
        if not matcher.accept(t):
            return True
    return matcher.is_terminated()


def fill_draft_bitmask(matcher: RequestMatcher, draft_ids: Sequence[int], bitmask: torch.Tensor,
                       start_row: int) -> int:
    """Speculation: fill rows start_row .. start_row + len(draft_ids) with the masks at each verified
    position (position k sees the first k drafts accepted), then restore the matcher. Positions after
    a draft the grammar refuses are left all-allowed: verification rejects that draft anyway, since its
    mask excludes it. Returns how many drafts the grammar accepts."""
    num_ok = 0
    for k in range(len(draft_ids) + 1):
        row = start_row + k
        if k > num_ok:
            bitmask[row].fill_(-1)
            continue
        matcher.fill_bitmask(bitmask, row)
        if k < len(draft_ids) and not matcher.is_terminated() and matcher.accept(draft_ids[k]):
            num_ok += 1
    matcher.rollback(num_ok)
    return num_ok
