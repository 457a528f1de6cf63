"""Verification of drafted tokens against the target model, exact for greedy and for sampling.

Rows: for each request, row 0 holds the logits after its last real token (the root) and row 1 + i the
logits after draft i (its context: the committed tokens and draft i's ancestors). The walk starts at
the root and descends into a child whose token the target accepts; the first position with no accepted
child emits one token of its own (the bonus, or the correction), so every step yields >= 1 token.

Greedy: a child is accepted when its token is the argmax, so the output is plain greedy decoding.
Sampling (temperature > 0): drafts are point masses (q(d) = 1), so child d is accepted with probability
p(d); on rejection d is removed from p and the next child is tried against the renormalised residual;
with no child left the token is drawn from the residual. This is sampling from p one candidate at a
time, so the output distribution is exactly p's (Leviathan et al. 2023; SpecInfer's multi-candidate
form). Seeded rows draw from the request's own generator, so a seeded request stays reproducible.
"""

from __future__ import annotations

import torch

from ember.layers.sampler import SamplingMetadata, apply_logit_bias, sampling_probs
from ember.spec.tree import SpecOutput, chain_parents, children


def verify_drafts(logits: torch.Tensor, meta: SamplingMetadata, drafts: list[list[int]],
                  trees: list[list[int] | None]) -> tuple[list[list[int]], list[SpecOutput]]:
    """logits [R, V] float32 with R = sum(len(d) + 1); `meta` has one row per logits row. Returns per
    request the tokens to append (accepted drafts + 1) and what happened to its drafts."""
    logits = apply_logit_bias(logits, meta)  # [R, V]: as plain sampling sees them
    argmax = logits.argmax(dim=-1).tolist()  # the one host sync for greedy rows
    probs = None if meta.is_all_greedy else sampling_probs(logits, meta)  # [R, V]
    temps = meta.temperatures.tolist()
    tokens_out, spec_out = [], []
    row = 0
    for draft, parents in zip(drafts, trees):
        parents = parents if parents is not None else chain_parents(len(draft))
        kids = children(parents)
        rows = range(row, row + len(draft) + 1)
        if temps[row] == 0:
            path, tok = _walk_greedy(draft, kids, [argmax[r] for r in rows])
        else:
            path, tok = _walk_sampled(draft, kids, probs[row:row + len(draft) + 1], meta.generators[row])
        tokens_out.append([draft[i] for i in path] + [tok])
        spec_out.append(SpecOutput(len(draft), path, [argmax[r] for r in rows]))
        row += len(draft) + 1
    return tokens_out, spec_out


def _walk_greedy(draft: list[int], kids: list[list[int]], target: list[int]) -> tuple[list[int], int]:
    path, node = [], -1
    while True:
        want = target[node + 1]
        nxt = next((c for c in kids[node + 1] if draft[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        node = nxt


def _walk_sampled(draft: list[int], kids: list[list[int]], probs: torch.Tensor,
                  gen: torch.Generator | None) -> tuple[list[int], int]:
    """probs [1 + len(draft), V]: the target distribution at the root and after each draft."""
    path, node = [], -1
    while True:
        p, is_copy = probs[node + 1], False  # [V]
        accepted = None
        for c in kids[node + 1]:
            d = draft[c]
            mass, total = p[d].item(), p.sum().item()
            if mass <= 0.0:
                continue  # already rejected (a duplicate) or outside top-k/top-p
            if _uniform(p.device, gen) * total < mass:
                accepted = c
                break
            if not is_copy:
                p, is_copy = p.clone(), True
            p[d] = 0.0  # the residual max(p - q, 0) for a point-mass draft
        if accepted is None:
            return path, _draw(p, gen)
        path.append(accepted)
        node = accepted


def _uniform(device, gen: torch.Generator | None) -> float:
    return torch.rand((), device=device, generator=gen).item()


def _draw(p: torch.Tensor, gen: torch.Generator | None) -> int:
    """One draw from the (unnormalised) distribution p: argmax(p / E), E ~ Exp(1)."""
    if p.sum().item() <= 0.0:
        return int(p.argmax().item())
    noise = torch.empty_like(p).exponential_(generator=gen)
    return int((p / noise).argmax().item())
