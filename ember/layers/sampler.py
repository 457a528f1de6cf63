"""Batched sampling: one pass over the logits of every sequence that samples this step.

Each row carries its own settings (temperature, top_k, top_p, min_p, penalties, seed). The work is
done with whole-batch tensor ops; Python loops run only over rows that need something special
(a seed, a min_tokens mask) and only to build small index tensors. Seeded rows draw their noise from
their own generator, so a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG_INF = float("-inf")


@dataclass
class SamplingMetadata:
    """Per-row sampling settings for N rows, gathered by the runner each step from its persistent rows."""

    temperatures: torch.Tensor  # [N] float32; 0 marks a greedy row
    top_ps: torch.Tensor | None  # [N] float32, None when no row uses top_p
    top_ks: torch.Tensor | None  # [N] int64 (vocab size for off), None when no row uses top_k
    min_ps: torch.Tensor | None  # [N] float32, None when no row uses min_p
    presence_penalties: torch.Tensor | None  # [N] float32, None when no row uses penalties
    frequency_penalties: torch.Tensor | None  # [N] float32
    repetition_penalties: torch.Tensor | None  # [N] float32
    output_token_counts: torch.Tensor | None  # [N, V] float32: each row's generated tokens, counted
    # (kept incrementally by the runner, never rebuilt from the history); None when no row has penalties
    prompt_token_mask: torch.Tensor | None  # [N, V] bool: tokens in each row's prompt (repetition penalty)
    banned_token_ids: list[list[int]] | None  # per row: tokens masked this step (EOS before min_tokens)
    generators: list[torch.Generator | None]  # per row: a seeded generator, or None
    num_logprobs: list[int | None]  # per row: None or k top logprobs wanted
    is_all_greedy: bool
    is_all_random: bool
    # OpenAI logit_bias of every row, flattened: ([2, K] int64 (row, token id) pairs, [K] float32 values);
    # None when no row has a bias
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class SamplerOutput:
    """What the sampler hands back: one token per row, and logprobs for rows that asked."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] float32: the sampled token's logprob (raw model distribution)
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # ([N, K] values, [N, K] ids), K = max k asked


class Sampler:
    """Turns logits into tokens under per-row settings; see the module docstring."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()  # [N, V]
        raw_logprobs = None
        if any(k is not None for k in meta.num_logprobs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = apply_logit_bias(apply_penalties(logits, meta), meta)
        if meta.banned_token_ids:
            rows, cols = _ragged_index(meta.banned_token_ids)
            if rows:
                logits = logits.clone()  # never write into the caller's tensor
                logits[rows, cols] = _NEG_INF
        greedy = logits.argmax(dim=-1)
        if meta.is_all_greedy:
            token_ids = greedy
        else:
            probs = sampling_probs(logits, meta)
            sampled = exponential_race(probs, meta.generators)
            token_ids = sampled if meta.is_all_random else torch.where(meta.temperatures == 0, greedy, sampled)
        return _gather_logprobs(raw_logprobs, token_ids, meta.num_logprobs)


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """OpenAI presence/frequency penalties over output tokens; HF repetition penalty over prompt+output."""
    counts = meta.output_token_counts  # [N, V]
    if counts is not None and (meta.presence_penalties is not None or meta.frequency_penalties is not None):
        if meta.frequency_penalties is not None:
            logits = logits - meta.frequency_penalties[:, None] * counts
        if meta.presence_penalties is not None:
            logits = logits - meta.presence_penalties[:, None] * (counts > 0).float()
    if meta.repetition_penalties is not None:
        seen = counts > 0 if counts is not None else torch.zeros_like(logits, dtype=torch.bool)  # [N, V]
        if meta.prompt_token_mask is not None:
            seen = seen | meta.prompt_token_mask
        pen = meta.repetition_penalties[:, None].expand_as(logits)
        penalized = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(seen, penalized, logits)
    return logits


def apply_logit_bias(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Add each row's logit_bias to its logits [N, V]: one scatter-add over the whole batch."""
    if meta.logit_bias is None:
        return logits
    index, values = meta.logit_bias  # [2, K], [K]
    return logits.index_put((index[0], index[1]), values, accumulate=True)  # a new tensor, never the caller's


def sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p filtering; returns the row-normalised probabilities."""
    temps = torch.where(meta.temperatures > 0, meta.temperatures, torch.ones_like(meta.temperatures))
    logits = logits / temps[:, None]
    if meta.top_ks is not None or meta.top_ps is not None:
        logits = _top_k_top_p(logits, meta.top_ks, meta.top_ps)
    probs = torch.softmax(logits, dim=-1)
    if meta.min_ps is not None:
        max_prob = probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < meta.min_ps[:, None] * max_prob, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [N, V]
    vocab = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        mask |= ranks >= top_ks[:, None]
    if top_ps is not None:
        probs = torch.softmax(sorted_logits.masked_fill(mask, _NEG_INF), dim=-1)
        cum = probs.cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        mask |= (cum - probs) >= top_ps[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample one token per row: argmax(p / E) with E ~ Exp(1) is a draw from p. Seeded rows use
    their own generator so their draw does not depend on the batch."""
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def _ragged_index(per_row: list[list[int]]) -> tuple[list[int], list[int]]:
    rows, cols = [], []
    for r, ids in enumerate(per_row):
        rows.extend([r] * len(ids))
        cols.extend(ids)
    return rows, cols


def _gather_logprobs(raw: torch.Tensor | None, token_ids: torch.Tensor, num_logprobs: list[int | None]) -> SamplerOutput:
    if raw is None:
        return SamplerOutput(token_ids, None, None)
    chosen = raw.gather(1, token_ids[:, None]).squeeze(1)
    k = max((n for n in num_logprobs if n is not None), default=0)
    top = raw.topk(k, dim=-1) if k > 0 else None
    return SamplerOutput(token_ids, chosen, (top.values, top.indices) if top is not None else None)
