"""`ember bench offline`: N prompts of fixed input/output lengths through ember, and the same workload
through transformers `generate` (batched, left-padded, same dtype and max tokens) in the same run.
`--structured json` also runs the same prompts with every request constrained by a JSON schema (one
that cannot complete within --output-len, so both runs produce the same number of tokens) and prints
the constrained / free throughput ratio: the cost of grammar masking."""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time

import torch

from ember.bench import spec as spec_bench
from ember.bench.hardware import copy_bandwidth_gbs
from ember.sampling_params import SamplingParams


def make_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int, special_ids: set[int]) -> list[list[int]]:
    rng = random.Random(seed)
    allowed = [t for t in range(min(vocab_size, 32000)) if t not in special_ids]
    return [[rng.choice(allowed) for _ in range(input_len)] for _ in range(num_prompts)]


# An array of records with at least as many items as output tokens: the grammar never completes early.
def bench_json_schema(output_len: int) -> dict:
    item = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                                             "name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"},
                                             "kind": {"enum": ["a", "b", "c"]}},
            "required": ["id", "name", "ok", "kind"], "additionalProperties": False}
    return {"type": "object", "properties": {"records": {"type": "array", "items": item, "minItems": output_len}},
            "required": ["records"], "additionalProperties": False}


def streamed_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every matrix, but only one row of the embedding table
    (unless the LM head is tied to it and reads it whole)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name and getattr(model, "lm_head", None) is not None:
            continue
        total += p.numel() * p.element_size()
    return total


def run_ember(llm, prompts: list[list[int]], output_len: int, structured=None, repeats: int = 1) -> dict:
    """`repeats` runs of all prompts after a warm-up; the fastest is reported (the same rule as the llama.cpp
    baseline's: on a shared machine the minimum is the stable figure)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, structured=structured)
    llm.generate([prompts[0][:8]], SamplingParams(max_tokens=4, ignore_eos=True, structured=structured))  # warm-up
    elapsed, outs = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        run = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
        took = time.perf_counter() - t0
        if took < elapsed:
            elapsed, outs = took, run
    num_out = sum(len(o.token_ids) for o in outs)
    ttfts = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    return {"elapsed_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "requests_s": len(prompts) / elapsed, "mean_ttft_s": sum(ttfts) / max(1, len(ttfts)),
            **phase_speeds(outs, sum(len(p) for p in prompts)), "token_ids": [o.token_ids for o in outs]}


def phase_speeds(outs, num_prompt_tokens: int) -> dict:
    """Prefill tok/s (until every request has its first token) and decode tok/s (every later token, until the
    last request finishes); exact for one prompt, a phase split of the whole run for many."""
    ms = [o.metrics for o in outs]
    if any(m.first_scheduled_time is None or m.first_token_time is None or m.finished_time is None for m in ms):
        return {}
    start, first_all = min(m.first_scheduled_time for m in ms), max(m.first_token_time for m in ms)
    end = max(m.finished_time for m in ms)
    decoded = sum(len(o.token_ids) for o in outs) - len(outs)
    return {"prefill_tok_s": num_prompt_tokens / max(first_all - start, 1e-9),
            "decode_tok_s": decoded / (end - first_all) if end > first_all else float("nan")}


def build_hf_model(llm):
    """A transformers model holding the same weights as the ember engine, in the same dtype."""
    from transformers import AutoModelForCausalLM

    setup = llm.engine.setup
    ckpt = setup.checkpoint
    model = AutoModelForCausalLM.from_config(ckpt.hf_config, dtype=setup.dtype)
    state = {name: t.to(setup.dtype) for name, t in ckpt.iter_weights()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "lm_head" not in m or not getattr(ckpt.hf_config, "tie_word_embeddings", False)]
    if (missing or unexpected) and ckpt.format == "safetensors":  # a layout transformers converts as it loads
        return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=setup.dtype).eval()  # (MoE experts: fused)
    if missing or unexpected:
        raise RuntimeError(f"transformers baseline: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(ckpt.hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int) -> dict:
    def one_batch(batch):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        return out.shape[0] * (out.shape[1] - width)

    one_batch([prompts[0][:8]])  # warm-up
    t0 = time.perf_counter()
    num_out = sum(one_batch(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size))
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "requests_s": len(prompts) / elapsed}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="config YAML, model dir, .gguf or engine dir (default model if omitted)")
    p.add_argument("--task", choices=["generate", "embed"], default="generate",
                   help="embed: an encoder config (or BERT-base's shape if none) vs transformers, embeddings/s")
    p.add_argument("--hf-dtype", default=None, help="--task embed: transformers' dtype (default: ember's)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="CPU: run ember's compiled forward (ember.compile)")
    p.add_argument("--baseline", choices=["hf", "vllm", "llamacpp", "none"], default="hf",
                   help="hf: transformers generate; vllm: vLLM's CPU backend (optional extra, see --vllm-python); "
                        "llamacpp: llama-cpp-python on the same GGUF (optional extra, see --llamacpp-python)")
    p.add_argument("--vllm-python", default=None, help="interpreter that can import vllm (default: this one)")
    p.add_argument("--llamacpp-python", default=None, help="interpreter that can import llama_cpp (default: this one)")
    p.add_argument("--llamacpp-model", default=None,
                   help="GGUF for llama.cpp (default: the engine's own GGUF, or the one it was built from)")
    p.add_argument("--llamacpp-threads", type=int, default=None, help="llama.cpp threads (default: ember's)")
    p.add_argument("--hf-batch-size", type=int, default=None, help="transformers batch size (default: all prompts)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    p.add_argument("--deterministic", action="store_true", help="ember.deterministic: batch-invariant outputs")
    p.add_argument("--speculator", choices=["none", "prompt_lookup", "lookahead", "both"], default="none",
                   help="compare speculative decoding with plain decoding on the same engine (greedy, checked identical)")
    p.add_argument("--workload", choices=["random", "code", "repeat"], default="random",
                   help="random token prompts, or real text prompts (code/JSON, repetitive) through the chat template")
    p.add_argument("--lookahead-window", type=int, default=None, help="lookahead W (default: tuned per device, "
                   "ember.bench.spec.DEFAULT_SIZES)")
    p.add_argument("--lookahead-ngram", type=int, default=None, help="lookahead N (default: tuned per device)")
    p.add_argument("--lookahead-verify", type=int, default=None, help="lookahead G (default: tuned per device)")
    p.add_argument("--num-draft", type=int, default=8, help="prompt lookup: longest draft")
    p.add_argument("--repeats", type=int, default=2, help="speculator runs: alternate plain/spec this many times; "
                   "plain runs: ember and the llama.cpp baseline each run the prompts this many times, the fastest kept")
    p.add_argument("--structured", choices=["none", "json"], default="none",
                   help="json: also run every request constrained by a JSON schema and compare with the free run")
    p.add_argument("--lora-adapters", type=int, default=0, metavar="N",
                   help="serve N random PEFT adapters and compare prompts mixed over them and the base model with the "
                        "base model alone (same run)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the --lora-adapters adapters")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="output tok/s of ember and transformers at each batch size (the prompts B at a time)")
    p.add_argument("--plot", default=None, help="write a PNG of output tok/s vs batch size, ember beside the baseline")


def main(args: argparse.Namespace) -> dict:
    if args.task == "embed":
        from ember.bench.embed import run_embed_bench

        return run_embed_bench(args)
    from ember import LLM

    overrides = {"dtype": args.dtype, "deterministic": getattr(args, "deterministic", False) or None}
    if getattr(args, "compile", False):
        overrides["compile"] = True
    if args.max_batch_size:
        overrides["max_batch_size"] = args.max_batch_size
    if args.speculator != "none":
        overrides["speculator"] = spec_bench.speculator_config(args.speculator, args)
    if getattr(args, "lora_adapters", 0):
        from ember.bench.lora import run_lora_bench

        res = run_lora_bench(args, overrides, lambda llm: make_prompts(
            llm.engine.runner.vocab_size, args.num_prompts, args.input_len, args.seed,
            set(getattr(llm.tokenizer, "all_special_ids", []) or [])))
        if args.json:
            print(json.dumps(res, indent=2))
        return res
    llm = LLM(args.model, **overrides)
    setup = llm.engine.setup
    tok = llm.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    if args.workload == "random":
        prompts = make_prompts(llm.engine.runner.vocab_size, args.num_prompts, args.input_len, args.seed, special)
    else:
        prompts = spec_bench.workload_prompts(llm, args.workload, args.num_prompts)
    if args.speculator != "none":
        res = spec_bench.run_spec_bench(llm, prompts, args.output_len, args.speculator, args.repeats)
        res.update(model=str(setup.checkpoint.path), dtype=str(setup.dtype).replace("torch.", ""),
                   workload=args.workload, threads=torch.get_num_threads())
        spec_bench.print_spec_table(res, args.workload)
        if args.json:
            print(json.dumps(res, indent=2))
        return res
    if getattr(args, "batch_sizes", None):
        return run_sweep(args, llm, prompts)
    bw = copy_bandwidth_gbs()
    weight_bytes = streamed_weight_bytes(llm.engine.runner.model)
    if getattr(args, "structured", "none") == "json":  # first-use costs of batch shapes must not land on either run
        warm = make_prompts(llm.engine.runner.vocab_size, args.num_prompts, args.input_len, args.seed + 1, special)
        llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    ember_res = run_ember(llm, prompts, args.output_len, repeats=args.repeats)
    res = {"model": str(setup.checkpoint.path), "dtype": str(setup.dtype).replace("torch.", ""),
           "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
           "threads": torch.get_num_threads(), "copy_bandwidth_gbs": bw, "weight_bytes": weight_bytes,
           "ember": {k: v for k, v in ember_res.items() if k != "token_ids"}}
    if getattr(args, "structured", "none") == "json":
        from ember.structured.spec import spec_from_response_format

        spec = spec_from_response_format({"type": "json_schema", "json_schema": {
            "name": "bench", "schema": bench_json_schema(args.output_len), "strict": True}})
        json_res = run_ember(llm, prompts, args.output_len, structured=spec, repeats=args.repeats)
        res["ember_json"] = {k: v for k, v in json_res.items() if k != "token_ids"}
        res["ratio_json_vs_free"] = json_res["output_tok_s"] / ember_res["output_tok_s"]
    if args.num_prompts == 1:
        # batch-1 decode streams the weights once per step: the share of the copy bandwidth it reaches
        step_s = ember_res["elapsed_s"] / max(1, args.output_len)
        res["ember"]["bandwidth_share"] = (weight_bytes / step_s) / (bw * 1e9 / 2)
    if args.baseline == "hf":
        gc.collect()
        hf_model = build_hf_model(llm)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (setup.eos_token_ids[0] if setup.eos_token_ids else 0)
        hf_res = run_hf(hf_model, prompts, args.output_len, args.hf_batch_size or args.num_prompts, pad)
        res["transformers"] = hf_res
        res["ratio_vs_transformers"] = ember_res["output_tok_s"] / hf_res["output_tok_s"]
    if args.baseline == "vllm":
        from ember.bench.vllm_baseline import run_vllm

        vllm_res = run_vllm(llm, prompts, args.output_len, args.vllm_python, res["dtype"])
        res["vllm"] = vllm_res
        res["ratio_vs_vllm"] = ember_res["output_tok_s"] / vllm_res["output_tok_s"]
    if args.baseline == "llamacpp":
        from pathlib import Path

        from ember.bench.llamacpp_baseline import gguf_of, run_llamacpp

        gguf = Path(args.llamacpp_model) if args.llamacpp_model else gguf_of(setup.checkpoint)
        threads = args.llamacpp_threads or torch.get_num_threads()
        lc = run_llamacpp(gguf, prompts, args.output_len, args.llamacpp_python, threads, args.repeats)
        res["llamacpp"] = {k: v for k, v in lc.items() if k != "token_ids"} | {"model": str(gguf), "threads": threads}
        res["ratio_vs_llamacpp"] = ember_res["output_tok_s"] / lc["output_tok_s"]
        for phase in ("decode", "prefill"):
            if f"{phase}_tok_s" in ember_res:
                res[f"{phase}_ratio_vs_llamacpp"] = ember_res[f"{phase}_tok_s"] / lc[f"{phase}_tok_s"]
    print_table(res)
    if getattr(args, "plot", None):
        point = {"batch_size": min(args.num_prompts, setup.scheduler.max_batch_size), "ember_tok_s": ember_res["output_tok_s"]}
        baseline = next((n for n in ("transformers", "vllm", "llamacpp") if n in res), None)
        if baseline is not None:
            point["baseline_tok_s"] = res[baseline]["output_tok_s"]
        write_plot(args, [point], baseline, res["model"])
    if args.json:
        print(json.dumps(res, indent=2))
    return res


def run_sweep(args: argparse.Namespace, llm, prompts: list[list[int]]) -> dict:
    """--batch-sizes: ember and transformers at each batch size over the same prompts."""
    from ember.bench.offline_sweep import run_batch_sweep

    if args.baseline not in ("hf", "none"):
        raise SystemExit(f"--batch-sizes compares against --baseline hf (or none), not {args.baseline}")
    setup = llm.engine.setup
    hf_model, pad = None, 0
    if args.baseline == "hf":
        hf_model = build_hf_model(llm)
        tok = llm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (setup.eos_token_ids[0] if setup.eos_token_ids else 0)
    points = run_batch_sweep(llm, prompts, args.output_len, args.batch_sizes, hf_model, pad)
    res = {"model": str(setup.checkpoint.path), "dtype": str(setup.dtype).replace("torch.", ""), "num_prompts": args.num_prompts,
           "input_len": args.input_len, "output_len": args.output_len, "threads": torch.get_num_threads(), "batch_sweep": points}
    if args.plot:
        write_plot(args, points, "transformers" if hf_model is not None else None, res["model"])
    if args.json:
        print(json.dumps(res, indent=2))
    return res


def write_plot(args: argparse.Namespace, points: list[dict], baseline: str | None, model: str) -> None:
    from pathlib import Path

    from ember.bench.plots import plot_offline

    title = f"{Path(model).name}: {args.num_prompts} prompts x ({args.input_len} in, {args.output_len} out)"
    plot_offline(points, args.plot, title, baseline)
    print(f"plot written to {args.plot}", file=sys.stderr)


def print_table(res: dict) -> None:
    rows = [("ember", res["ember"])] + ([("ember json", res["ember_json"])] if "ember_json" in res else [])
    for name in ("transformers", "vllm", "llamacpp"):
        if name in res:
            rows.append((name, res[name]))
    print(f"\nmodel {res['model']}  dtype {res['dtype']}  threads {res['threads']}  "
          f"{res['num_prompts']} prompts x ({res['input_len']} in, {res['output_len']} out)")
    print(f"{'engine':<14}{'out tok/s':>12}{'decode tok/s':>14}{'prefill tok/s':>15}{'req/s':>10}"
          f"{'mean TTFT s':>14}{'elapsed s':>12}")
    for name, r in rows:
        ttft = f"{r['mean_ttft_s']:.3f}" if "mean_ttft_s" in r else "-"
        phases = "".join(f"{r[k]:>{w}.1f}" if k in r else f"{'-':>{w}}" for k, w in (("decode_tok_s", 14),
                                                                                     ("prefill_tok_s", 15)))
        print(f"{name:<14}{r['output_tok_s']:>12.1f}{phases}{r['requests_s']:>10.2f}{ttft:>14}{r['elapsed_s']:>12.2f}")
    if "ratio_json_vs_free" in res:
        print(f"ember json-schema constrained / free: {res['ratio_json_vs_free']:.3f}x")
    for name in ("transformers", "vllm", "llamacpp"):
        if f"ratio_vs_{name}" in res:
            phases = "".join(f", {phase} {res[f'{phase}_ratio_vs_{name}']:.2f}x" for phase in ("decode", "prefill")
                             if f"{phase}_ratio_vs_{name}" in res)
            print(f"ember / {name}: {res[f'ratio_vs_{name}']:.2f}x (output tok/s{phases})")
    if "bandwidth_share" in res["ember"]:
        print(f"copy bandwidth {res['copy_bandwidth_gbs']:.1f} GB/s; weights {res['weight_bytes'] / 1e6:.0f} MB; "
              f"batch-1 decode reaches {100 * res['ember']['bandwidth_share']:.0f}% of the weight-streaming limit")
