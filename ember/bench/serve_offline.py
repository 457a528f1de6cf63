"""`ember bench serve --vs-offline`: the same engine offline (`LLM.generate` in this process, before the server
starts, so the two never share the CPU) at each concurrency level as its batch size, the same prompts and
lengths; then the server's output tok/s beside the offline tok/s, and the server's TPOT at concurrency 1 beside
the offline decode time per token (finished - first token over output tokens - 1)."""

from __future__ import annotations

import gc
import time


def offline_levels(config: str | None, concurrencies: list[int], input_len: int, output_len: int, seed: int,
                   num_rounds: int = 2) -> dict[int, dict]:
    """{concurrency: {"output_throughput", "decode_ms_per_token"}}: each level's batch run num_rounds times."""
    import random

    from ember import LLM, SamplingParams

    llm = LLM(config)
    vocab = llm.engine.runner.vocab_size
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0.0)
    llm.generate([[rng.randrange(100, vocab - 100) for _ in range(input_len)]], params)  # warm-up
    results = {}
    for c in concurrencies:
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(c)]
        tokens, seconds, decode = 0, 0.0, []
        for _ in range(num_rounds):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            seconds += time.perf_counter() - t0
            tokens += sum(len(o.token_ids) for o in outs)
            decode += [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.token_ids) - 1) for o in outs]
        results[c] = {"output_throughput": tokens / seconds, "decode_ms_per_token": 1e3 * sum(decode) / len(decode)}
    del llm
    gc.collect()
    return results


def format_comparison(summaries: list[dict], offline: dict[int, dict]) -> str:
    lines = ["\nserver vs the same engine offline (batch size = concurrency)",
             f"{'concurrency':>12}{'server tok/s':>14}{'offline tok/s':>15}{'ratio':>8}"
             f"{'server TPOT p50 ms':>20}{'offline decode ms/tok':>23}{'ratio':>8}"]
    for s in summaries:
        off = offline.get(s["concurrency"])
        if off is None:
            continue
        tput_ratio = s["output_throughput"] / off["output_throughput"]
        tpot = s.get("p50_tpot_ms")
        tpot_cells = (f"{tpot:>20.2f}{off['decode_ms_per_token']:>23.2f}{tpot / off['decode_ms_per_token']:>8.2f}"
                      if tpot is not None else f"{'-':>20}{off['decode_ms_per_token']:>23.2f}{'-':>8}")
        lines.append(f"{s['concurrency']:>12}{s['output_throughput']:>14.1f}{off['output_throughput']:>15.1f}"
                     f"{tput_ratio:>8.2f}" + tpot_cells)
    return "\n".join(lines)
