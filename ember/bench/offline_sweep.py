"""`ember bench offline --batch-sizes B [B ...]`: output tok/s of ember and of the transformers baseline at each
batch size, the same prompts and lengths (ember runs the prompts B at a time, transformers `generate` batches B
left-padded prompts), for a table and `--plot`'s tok/s-vs-batch-size figure."""

from __future__ import annotations

import sys
import time

from ember.sampling_params import SamplingParams


def ember_tok_s(llm, prompts: list[list[int]], output_len: int, batch_size: int) -> float:
    """Output tok/s of `prompts` through `llm`, `batch_size` at a time (each group one generate call)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    num_out, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        num_out += sum(len(o.token_ids) for o in llm.generate(prompts[i:i + batch_size], params, use_tqdm=False))
    return num_out / (time.perf_counter() - t0)


def run_batch_sweep(llm, prompts: list[list[int]], output_len: int, batch_sizes: list[int], hf_model, pad_id: int) -> list[dict]:
    """[{"batch_size", "ember_tok_s", "baseline_tok_s" (with `hf_model`), "ratio"}], one per batch size."""
    from ember.bench.offline import run_hf

    max_batch = llm.engine.setup.scheduler.max_batch_size
    too_big = [b for b in batch_sizes if b > max_batch]
    if too_big:
        raise SystemExit(f"--batch-sizes {too_big} exceed the engine's max_batch_size {max_batch}; "
                         f"raise it with --max-batch-size")
    llm.generate(prompts[:max(batch_sizes)], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    points = []
    for b in batch_sizes:
        point = {"batch_size": b, "ember_tok_s": ember_tok_s(llm, prompts, output_len, b)}
        if hf_model is not None:
            point["baseline_tok_s"] = run_hf(hf_model, prompts, output_len, b, pad_id)["output_tok_s"]
            point["ratio"] = point["ember_tok_s"] / point["baseline_tok_s"]
        points.append(point)
        print(f"batch {b:>4}: ember {point['ember_tok_s']:.1f} tok/s"
              + (f", transformers {point['baseline_tok_s']:.1f} tok/s, ratio {point['ratio']:.2f}x" if "ratio" in point else ""),
              file=sys.stderr)
    return points
