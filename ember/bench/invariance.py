"""`ember bench invariance`: how often (and how late) a request's greedy output changes when it runs in a
batch instead of alone. Exact in float32; in bfloat16, batch-dependent rounding can flip near-ties unless
`--deterministic` (ember.deterministic: batch-invariant attention) is on."""

from __future__ import annotations

import argparse
import json
import time

from ember.bench.offline import make_prompts
from ember.sampling_params import SamplingParams


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-alone", type=int, default=16, help="requests also run alone for reference")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-tokens", type=int, default=256, help="small token budget: chunked prefill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="ember.deterministic: batch-invariant outputs")
    p.add_argument("--cost", action="store_true",
                   help="with --deterministic: also time the batch on a default engine (same process, alternating runs) "
                        "and report deterministic / default throughput")
    p.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> dict:
    from ember import LLM

    llm = LLM(args.model, dtype=args.dtype, max_num_tokens=args.max_num_tokens, deterministic=args.deterministic)
    special = set(getattr(llm.tokenizer, "all_special_ids", []) or [])
    prompts = make_prompts(llm.engine.runner.vocab_size, args.num_prompts, args.input_len, args.seed, special)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    batch = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=True)]
    firsts = []
    for p, b in zip(prompts[: args.num_alone], batch):
        alone = llm.generate([p], params)[0].token_ids
        first = next((i for i, (x, y) in enumerate(zip(alone, b)) if x != y), None)
        firsts.append(first)
    diverged = [f for f in firsts if f is not None]
    res = {"dtype": args.dtype, "deterministic": args.deterministic, "compared": len(firsts), "identical": len(firsts) - len(diverged),
           "diverged": len(diverged), "first_divergence_positions": diverged, "output_len": args.output_len}
    print(f"{res['identical']}/{res['compared']} requests identical alone vs in a batch of {args.num_prompts} "
          f"({args.dtype}{', deterministic' if args.deterministic else ''}); divergence positions: {diverged or '-'}")
    if args.cost and args.deterministic:
        res["throughput_ratio"] = _cost(llm, prompts, params, args)
    if args.json:
        print(json.dumps(res))
    return res


def _cost(det_llm, prompts, params, args, repeats: int = 2) -> float:
    """Deterministic / default throughput on the batch workload: best of `repeats` alternating runs each."""
    from ember import LLM

    default = LLM(args.model, dtype=args.dtype, max_num_tokens=args.max_num_tokens)
    best = {True: 0.0, False: 0.0}
    for _ in range(repeats):
        for det, llm in ((False, default), (True, det_llm)):
            start = time.perf_counter()
            llm.generate(prompts, params)
            best[det] = max(best[det], len(prompts) * params.max_tokens / (time.perf_counter() - start))
    default.engine.shutdown()
    ratio = best[True] / best[False]
    print(f"throughput: default {best[False]:.1f} tok/s, deterministic {best[True]:.1f} tok/s ({ratio:.2f}x)")
    return ratio
