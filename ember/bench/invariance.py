"""`ember bench invariance`: how often (and how late) a request's greedy output changes when it runs in a
batch instead of alone. Exact in float32; in bfloat16, batch-dependent rounding can flip near-ties unless
`--deterministic` (ember.deterministic: batch-invariant attention) is on."""

from __future__ import annotations

import argparse
import json

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
    if args.json:
        print(json.dumps(res))
    return res
