"""Builds the sampler's per-row tensors from the requests that sample this step."""

from __future__ import annotations

import torch

from ember.layers.sampler import SamplingMetadata


def _padded(rows: list[list[int]], device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def build_sampling_metadata(requests: list, generators: dict, vocab_size: int, device) -> SamplingMetadata:
    """`requests`: core Requests, one per sampling row, in row order. `generators`: request_id -> the
    request's seeded torch.Generator (created here on first use, kept by the caller)."""
    params = [r.sampling_params for r in requests]
    temps = [p.temperature for p in params]
    is_all_greedy = all(t == 0 for t in temps)
    is_all_random = all(t > 0 for t in temps)

    def column(values, default, dtype):
        if all(v == default for v in values):
            return None
        return torch.tensor(values, dtype=dtype, device=device)

    top_ks = column([p.top_k if p.top_k > 0 else vocab_size for p in params], vocab_size, torch.int64)
    top_ps = column([p.top_p for p in params], 1.0, torch.float32)
    min_ps = column([p.min_p for p in params], 0.0, torch.float32)
    presence = column([p.presence_penalty for p in params], 0.0, torch.float32)
    frequency = column([p.frequency_penalty for p in params], 0.0, torch.float32)
    repetition = column([p.repetition_penalty for p in params], 1.0, torch.float32)
    needs_outputs = presence is not None or frequency is not None or repetition is not None
    output_ids = _padded([r.output_token_ids for r in requests], device) if needs_outputs else None
    prompt_ids = _padded([r.prompt_token_ids for r in requests], device) if repetition is not None else None

    banned = None
    for i, (r, p) in enumerate(zip(requests, params)):
        completed = r.matcher is not None and r.matcher.is_completed()  # only EOS may follow: don't ban it
        if p.min_tokens and len(r.output_token_ids) < p.min_tokens and not completed:
            banned = banned or [[] for _ in requests]
            eos = [] if p.ignore_eos else sorted(r.eos_token_ids)
            banned[i] = [t for t in eos + list(p.stop_token_ids) if 0 <= t < vocab_size]

    gens: list[torch.Generator | None] = []
    for r, p in zip(requests, params):
        if p.seed is None or p.temperature == 0:
            gens.append(None)
            continue
        gen = generators.get(r.request_id)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(p.seed)
            generators[r.request_id] = gen
        gens.append(gen)

    return SamplingMetadata(
        temperatures=torch.tensor(temps, dtype=torch.float32, device=device),
        top_ps=top_ps, top_ks=top_ks, min_ps=min_ps,
        presence_penalties=presence, frequency_penalties=frequency, repetition_penalties=repetition,
        output_token_ids=output_ids, prompt_token_ids=prompt_ids, banned_token_ids=banned,
        generators=gens, num_logprobs=[p.logprobs for p in params],
        is_all_greedy=is_all_greedy, is_all_random=is_all_random,
    )
