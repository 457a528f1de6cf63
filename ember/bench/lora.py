"""`ember bench offline --lora-adapters N`: the cost of multi-LoRA. N random PEFT adapters (made with peft for
the benchmarked model's architecture, in a temporary directory) are served beside the base model; the same
prompts run once on the base model alone and once spread round-robin over the N adapters and the base model,
all in one continuous batch, in the same run. The ratio mixed / base is the throughput kept with LoRA."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from ember.sampling_params import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_random_adapters(hf_config, num: int, rank: int, out_dir: Path) -> dict[str, dict]:
    """`num` PEFT adapters with random A and B for a model of `hf_config`: name -> checkpoint repository."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    repos = {}
    for i in range(num):
        with torch.device("meta"):  # only the module shapes are needed; the LoRA tensors are made for real below
            model = AutoModelForCausalLM.from_config(hf_config)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      init_lora_weights=False))
        gen = torch.Generator().manual_seed(i)
        for name, p in list(peft_model.named_parameters()):
            if "lora_" in name:
                data = torch.randn(tuple(p.shape), generator=gen) * (0.02 if "lora_B" in name else p.shape[-1] ** -0.5)
                parent, _, attr = name.rpartition(".")
                peft_model.get_submodule(parent)._parameters[attr] = torch.nn.Parameter(data, requires_grad=False)
        path = out_dir / f"bench-lora-{i}"
        peft_model.save_pretrained(path, safe_serialization=True)
        repos[f"bench-lora-{i}"] = {"source": "LOCAL", "repo": str(path)}
    return repos


def _timed(llm, prompts, output_len: int, lora_names) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty(), lora_name=lora_names)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(o.token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "requests_s": len(prompts) / elapsed}


def run_lora_bench(args, overrides: dict, make_prompts) -> dict:
    from ember import LLM
    from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
    from ember.config import load_config

    cfg = load_config(args.model, **overrides)
    hf_config = load_checkpoint(resolve_checkpoint_path(cfg.trt_llm.build.checkpoint_repository)).hf_config
    n = args.lora_adapters
    with tempfile.TemporaryDirectory(prefix="ember-bench-lora-") as tmp:
        repos = make_random_adapters(hf_config, n, args.lora_rank, Path(tmp))
        llm = LLM(cfg, lora_adapters=repos, max_loras=max(n, 1),
                  lora_configuration={"max_lora_rank": max(args.lora_rank, 1)})
        prompts = make_prompts(llm)
        names = list(repos)
        mixed = [names[i % (n + 1)] if i % (n + 1) < n else None for i in range(len(prompts))]
        llm.generate([prompts[0][:8]] * (n + 1), SamplingParams(max_tokens=4, ignore_eos=True),
                     lora_name=names + [None])  # warm-up, every adapter into its slot
        runs = {"base": [], "mixed": []}
        for _ in range(max(1, args.repeats)):  # alternate, so drifting machine load hits both alike
            runs["base"].append(_timed(llm, prompts, args.output_len, None))
            runs["mixed"].append(_timed(llm, prompts, args.output_len, mixed))
    best = {k: max(v, key=lambda r: r["output_tok_s"]) for k, v in runs.items()}
    setup = llm.engine.setup
    res = {"model": str(setup.checkpoint.path), "dtype": str(setup.dtype).replace("torch.", ""),
           "num_prompts": len(prompts), "input_len": args.input_len, "output_len": args.output_len,
           "threads": torch.get_num_threads(), "num_adapters": n, "lora_rank": args.lora_rank,
           "lora_targets": TARGETS, "repeats": max(1, args.repeats),
           "base": best["base"], "lora_mixed": best["mixed"],
           "ratio_lora_mixed_vs_base": best["mixed"]["output_tok_s"] / best["base"]["output_tok_s"]}
    print(f"\nmodel {res['model']}  dtype {res['dtype']}  threads {res['threads']}  {res['num_prompts']} prompts x "
          f"({res['input_len']} in, {res['output_len']} out)  {n} adapters of rank {args.lora_rank} on "
          f"{', '.join(TARGETS)}; best of {res['repeats']}")
    print(f"{'run':<26}{'out tok/s':>12}{'req/s':>10}{'elapsed s':>12}")
    for label, r in ((f"base model only", best["base"]), (f"{n} adapters + base, mixed", best["mixed"])):
        print(f"{label:<26}{r['output_tok_s']:>12.1f}{r['requests_s']:>10.2f}{r['elapsed_s']:>12.2f}")
    print(f"multi-LoRA mixed batch / base model: {res['ratio_lora_mixed_vs_base']:.3f}x")
    return res
