"""The build's quality and size report: the engine against the unquantized model it came from.

Quality is measured on held-out text (never the calibration set): perplexity of each model, and greedy
agreement, the share of positions where both models' most likely next token is the same (teacher-forced
over the held-out prompts, so one divergence does not hide the rest).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from ember.build.calibration import forward_logits


@torch.no_grad()
def compare_models(reference, engine, samples: list[list[int]], progress: bool = True) -> dict:
    """Perplexity of both models and their greedy agreement over `samples` (token id lists)."""
    nll_ref = nll_eng = 0.0
    agree = total = 0
    max_abs_logit_diff = 0.0
    for ids in tqdm(samples, desc="evaluating", unit="prompt", disable=not progress):
        target = torch.tensor(ids[1:], dtype=torch.int64, device=reference.device)  # [T-1]
        # two chunks: the second half reads the first half's K/V back from the (possibly quantized) cache
        ref_logits, _ = forward_logits(reference, ids, chunks=2)
        eng_logits, _ = forward_logits(engine, ids, chunks=2)
        ref_logits, eng_logits = ref_logits[:-1], eng_logits[:-1]  # [T-1, V]
        nll_ref += float(torch.nn.functional.cross_entropy(ref_logits, target, reduction="sum"))
        nll_eng += float(torch.nn.functional.cross_entropy(eng_logits, target, reduction="sum"))
        agree += int((ref_logits.argmax(-1) == eng_logits.argmax(-1)).sum())
        total += len(target)
        max_abs_logit_diff = max(max_abs_logit_diff, float((ref_logits - eng_logits).abs().max()))
    ppl_ref, ppl_eng = math.exp(nll_ref / max(total, 1)), math.exp(nll_eng / max(total, 1))
    return {
        "num_prompts": len(samples),
        "num_tokens": total,
        "perplexity_unquantized": ppl_ref,
        "perplexity": ppl_eng,
        "perplexity_delta": ppl_eng - ppl_ref,
        "perplexity_delta_pct": 100.0 * (ppl_eng - ppl_ref) / ppl_ref,
        "greedy_agreement": agree / max(total, 1),
        "max_abs_logit_diff": max_abs_logit_diff,
    }


def format_report(report: dict) -> str:
    """The report as the few lines printed at the end of a build."""
    size, q, kv = report["size"], report["quality"], report["kv_cache"]
    mb = 1e6
    lines = [
        f"engine {report['quantization_type']}: weights {size['weights_bytes'] / mb:.2f} MB on disk vs "
        f"{size['unquantized_bytes'] / mb:.2f} MB unquantized ({size['dtype']}): "
        f"{size['compression']:.2f}x smaller",
        f"quality on {q['num_prompts']} held-out prompts ({q['num_tokens']} tokens): perplexity "
        f"{q['perplexity']:.3f} vs {q['perplexity_unquantized']:.3f} unquantized "
        f"({q['perplexity_delta']:+.3f}, {q['perplexity_delta_pct']:+.2f}%), greedy agreement "
        f"{100 * q['greedy_agreement']:.1f}%",
        f"KV cache: {kv['dtype']}, {kv['bytes_per_token']} bytes per token, {kv['capacity_factor']:.1f}x the tokens "
        f"of a {size['dtype']} cache in the same memory",
    ]
    return "\n".join(lines)
