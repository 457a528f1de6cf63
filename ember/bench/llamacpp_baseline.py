"""llama.cpp as an optional baseline for `ember bench offline --baseline llamacpp`.

llama-cpp-python runs in its own interpreter (`--llamacpp-python`, e.g. a venv holding the optional extra
`llamacpp`) on the same GGUF file the engine was loaded or built from, with the same token-id prompts,
greedy, one prompt at a time (as its server runs them). It reports prefill and decode separately: prefill
is the evaluation of the prompt, decode every later token. The result comes back as one JSON line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

RESULT_PREFIX = "EMBER_RESULT "

_SCRIPT = r"""
import json, sys, time


def main():
    import llama_cpp.llama_cpp as lib
    from llama_cpp import Llama

    spec = json.load(open(sys.argv[1]))
    default_params = lib.llama_model_default_params

    def model_params():  # Llama() exposes no switch for the extra (AMX / repacked) weight buffers
        params = default_params()
        params.use_extra_bufts = spec["use_extra_bufts"]
        return params

    lib.llama_model_default_params = model_params
    llm = Llama(model_path=spec["model"], n_threads=spec["n_threads"], n_threads_batch=spec["n_threads"],
                n_ctx=spec["n_ctx"], n_batch=spec["n_batch"], seed=0, verbose=False)

    def run(prompt, output_len):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [llm.sample(temp=0.0, top_k=1)]  # greedy
        t1 = time.perf_counter()
        while len(tokens) < output_len:  # ignore_eos: always output_len tokens, like ember's run
            llm.eval([tokens[-1]])
            tokens.append(llm.sample(temp=0.0, top_k=1))
        return t1 - t0, time.perf_counter() - t1, tokens

    run(spec["prompts"][0][:8], 4)  # warm-up
    best = None
    for _ in range(spec.get("repeats", 1)):  # the fastest pass over all prompts, as ember's side keeps
        prefill_s = decode_s = 0.0
        token_ids = []
        for prompt in spec["prompts"]:
            p, d, toks = run(prompt, spec["output_len"])
            prefill_s, decode_s = prefill_s + p, decode_s + d
            token_ids.append(toks)
        if best is None or prefill_s + decode_s < best[0] + best[1]:
            best = (prefill_s, decode_s, token_ids)
    print("EMBER_RESULT " + json.dumps({"prefill_s": best[0], "decode_s": best[1], "token_ids": best[2],
                                        "use_extra_bufts": spec["use_extra_bufts"]}), flush=True)


if __name__ == "__main__":
    main()
"""


def gguf_of(checkpoint) -> Path:
    """The GGUF file behind an engine's checkpoint: the file itself, or the one a built engine came from."""
    if str(checkpoint.path).endswith(".gguf"):
        return Path(checkpoint.path)
    source = (getattr(checkpoint, "manifest", None) or {}).get("build", {}).get("source", {})
    if source.get("format") == "gguf" and source.get("path"):
        return Path(source["path"])
    raise ValueError(f"--baseline llamacpp needs a GGUF file: {checkpoint.path} is neither one nor an engine built "
                     "from one; pass --llamacpp-model PATH")


def summarize(raw: dict, prompts: list[list[int]], output_len: int) -> dict:
    """Per-phase speeds from the script's raw timings (all prompts, run one after another)."""
    num_out = sum(len(t) for t in raw["token_ids"])
    num_prompt = sum(len(p) for p in prompts)
    elapsed = raw["prefill_s"] + raw["decode_s"]
    decoded = num_out - len(prompts)  # the first token of each prompt comes out of its prefill
    return {"elapsed_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "requests_s": len(prompts) / elapsed, "mean_ttft_s": raw["prefill_s"] / len(prompts),
            "prefill_tok_s": num_prompt / raw["prefill_s"],
            "decode_tok_s": decoded / raw["decode_s"] if raw["decode_s"] > 0 else float("nan")}


def parse_result(stdout: str, stderr: str, returncode: int) -> dict:
    """The script's JSON result line; RuntimeError naming the root error when there is none."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    errors = [line for line in (stdout + stderr).splitlines() if "Error" in line]
    raise RuntimeError(f"the llama.cpp baseline failed (exit {returncode}): "
                       f"{errors[-1] if errors else stderr[-2000:] or 'no output'}")


def run_llamacpp(gguf: Path, prompts: list[list[int]], output_len: int, python: str | None,
                 num_threads: int, repeats: int = 1) -> dict:
    """Run the prompts through llama-cpp-python in `python` (default: this interpreter). llama.cpp's extra
    weight buffers (AMX, repacked layouts) are tried first; where they crash it (SIGSEGV in its AMX matmul on
    some virtual machines) the run is repeated with the plain CPU buffers, and the result says which ran.
    `repeats`: passes over the prompts; the fastest is reported."""
    spec = {"model": str(gguf), "prompts": prompts, "output_len": output_len, "n_threads": num_threads,
            "repeats": repeats,
            "n_ctx": max(len(p) for p in prompts) + output_len + 16, "n_batch": max(512, max(len(p) for p in prompts))}
    with tempfile.TemporaryDirectory(prefix="ember-llamacpp-") as tmp:
        script = Path(tmp) / "run_llamacpp.py"
        script.write_text(_SCRIPT)
        for use_extra_bufts in (True, False):
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps(spec | {"use_extra_bufts": use_extra_bufts}))
            proc = subprocess.run([python or sys.executable, str(script), str(spec_path)], capture_output=True,
                                  text=True)
            if proc.returncode != -signal.SIGSEGV:
                break
    raw = parse_result(proc.stdout, proc.stderr, proc.returncode)
    res = summarize(raw, prompts, output_len)
    res["use_extra_bufts"] = raw["use_extra_bufts"]
    res["token_ids"] = raw["token_ids"]
    return res
