"""`ember bench`: the one benchmark harness (offline, invariance, and serving load against a live server)."""

from __future__ import annotations

import argparse

from ember.bench import attention, gpu, int4, invariance, moe, offline, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench", description="ember benchmarks")
    sub = parser.add_subparsers(dest="mode", required=True)
    offline.add_args(sub.add_parser("offline", help="N prompts through the engine vs transformers generate"))
    invariance.add_args(sub.add_parser("invariance", help="greedy outputs alone vs in a batch"))
    serve.add_args(sub.add_parser("serve", help="TTFT/TPOT/ITL/latency/throughput/goodput against an OpenAI-compatible server"))
    gpu.add_args(sub.add_parser("gpu", help="a published architecture with random weights: decode/prefill tok/s "
                                            "vs transformers and the device's measured limits"))
    int4.add_args(sub.add_parser("int4", help="the int4 CPU matmuls vs bf16 per batch size, on a model's Linear shapes"))
    attention.add_args(sub.add_parser("attention", help="batched decode / speculative attention: one SDPA call vs "
                                                        "the matmul chain, per batch size"))
    moe.add_args(sub.add_parser("moe", help="a random tiny-ish Mixtral: MoE decode tok/s vs transformers per batch size"))
    args = parser.parse_args(argv)
    if args.mode == "offline":
        offline.main(args)
    elif args.mode == "invariance":
        invariance.main(args)
    elif args.mode == "serve":
        serve.main(args)
    elif args.mode == "gpu":
        gpu.main(args)
    elif args.mode == "int4":
        int4.main(args)
    elif args.mode == "attention":
        attention.main(args)
    elif args.mode == "moe":
        moe.main(args)
    return 0
