"""tensor_parallel_count 2 (two gloo ranks on the CPU) gives the same greedy tokens as 1: every architecture,
a quantized engine, the default model; through LLM.generate and through the server. A killed worker rank
makes the server unhealthy and exit. Each TP=2 engine spawns one worker process; kept tiny (2 shared cores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ember import LLM, SamplingParams

from ember.checkpoint.default import default_model_path

from tp_models import ARCHS

PROMPTS = [[5, 9, 17, 33, 8, 120], [100, 3, 4], [7] * 11]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def greedy_tokens(source, tp: int, prompts=PROMPTS, params=GREEDY, **overrides) -> list[list[int]]:
    llm = LLM(str(source), tensor_parallel_count=tp, device="cpu", **overrides)
    try:
        return [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tp2_matches_tp1(tiny_checkpoints, arch):
    path = tiny_checkpoints[arch]
    assert greedy_tokens(path, 2, dtype="float32") == greedy_tokens(path, 1, dtype="float32")


@pytest.mark.parametrize("qtype", ["int8", "int4", "fp8"])
def test_tp2_quantized_engine(tiny_checkpoints, tmp_path, qtype):
    from ember.build.builder import build_engine
    from ember.config import load_config

    cfg = load_config({"model_name": "tiny", "trt_llm": {"build": {
        "checkpoint_repository": {"source": "LOCAL", "repo": str(tiny_checkpoints["quant"])},
        "quantization_type": qtype, "quantization_config": {"calib_size": 2, "calib_max_seq_length": 32}}},
        "ember": {"dtype": "float32", "device": "cpu"}})
    # int4 groups of 32: the row-parallel layers' per-rank inputs (64 of 128) hold whole groups
    engine = build_engine(cfg, tmp_path / "engine", int4_group_size=32, num_eval_prompts=1, eval_max_seq_length=16,
                          progress=False, log=lambda *_: None)
    # float32 activations: in bf16 a one-ulp logit difference (the sum order changes with TP) can flip a near-tie
    assert greedy_tokens(engine, 2, dtype="float32") == greedy_tokens(engine, 1, dtype="float32")


def test_tp2_default_model():
    prompts = ["def fib(n):", "The capital of France is"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert greedy_tokens(default_model_path(), 2, prompts, params, dtype="float32") == \
        greedy_tokens(default_model_path(), 1, prompts, params, dtype="float32")


def _serve(path, tp: int, port: int) -> subprocess.Popen:
    cfg = path.parent / f"serve_tp{tp}.yaml"
    cfg.write_text(f"model_name: tiny\ntrt_llm:\n  build:\n    checkpoint_repository: {{source: LOCAL, repo: {path}}}\n"
                   f"    tensor_parallel_count: {tp}\nember: {{dtype: float32, device: cpu}}\n")
    return subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", str(cfg), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc, url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def _worker_pids(pid: int) -> list[int]:
    """The server's worker ranks (`python -m ember.distributed.worker ...`), children of its engine core process."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    procs = [(int(line.split()[0]), int(line.split()[1]), line) for line in out.splitlines() if line.strip()]
    family = {pid}
    for _ in range(3):  # server -> engine core -> ranks
        family |= {p for p, parent, _ in procs if parent in family}
    return [p for p, parent, line in procs if parent in family and p != pid and "ember.distributed.worker" in line]


def test_server_tp2_matches_and_dies_with_a_worker(tiny_checkpoints):
    from ember.distributed.launch import free_port

    path = tiny_checkpoints["LlamaForCausalLM"]
    llm = LLM(str(path), tensor_parallel_count=1, device="cpu", dtype="float32")
    expected = llm.generate([PROMPTS[0]], GREEDY)[0].text  # what the engine's detokenizer makes of the TP=1 tokens
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(path, 2, port)
    try:
        _wait_ready(proc, url)
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 10,
                                                       "temperature": 0.0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        workers = _worker_pids(proc.pid)
        assert workers, "no worker rank process"
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 60:  # the server exits hard after 10 s at most
            try:  # unhealthy until it exits
                assert httpx.get(f"{url}/health", timeout=1.0).status_code in (200, 503)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        exited = proc.poll() is not None
        if not exited:
            proc.kill()
        out = proc.stdout.read()
        assert exited, f"the server did not exit after its worker rank was killed:\n{out[-3000:]}"
        assert proc.returncode != 0
        assert "tensor-parallel worker rank 1" in out and "exited with code -9" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_tp2_persistent_batch_with_preemption_penalties_seeds_and_tree_drafts(tiny_checkpoints):
    """Every rank keeps its own persistent batch from the step deltas: rows freed and rebuilt on preemption,
    KV moves of accepted tree drafts applied by the workers with the next step, sampling only on rank 0."""
    path = tiny_checkpoints["LlamaForCausalLM"]
    prompts = [[5, 9, 17, 33, 8, 120] * 3, [100, 3, 4], [7, 8] * 9, [11, 12, 13, 14] * 2]
    params = [GREEDY, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.4,
                                     frequency_penalty=0.5),
              SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True), GREEDY]
    # 2 KB blocks of 8 tokens: 46 KB holds 20 blocks for one rank, 10 per rank for two (the ranks share the
    # budget), fewer than the 4 requests' 16 at full length: the TP=2 engine preempts
    overrides = dict(dtype="float32", batch_scheduler_policy="max_utilization", max_num_tokens=16,
                     kv_cache_memory_bytes=46_000, block_size=8,
                     speculator=dict(speculative_decoding_mode="LOOKAHEAD_DECODING", lookahead_windows_size=3,
                                     lookahead_ngram_size=3, lookahead_verification_set_size=3,
                                     enable_b10_lookahead=True))
    llm = LLM(str(path), tensor_parallel_count=2, device="cpu", **overrides)
    sched, preempted = llm.engine.scheduler, []
    preempt = sched._preempt
    sched._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
    try:
        tp2 = [o.token_ids for o in llm.generate(prompts, params)]
        drafted = llm.engine.core.stats_draft_tokens
    finally:
        llm.engine.shutdown()
    assert preempted and drafted > 0
    assert tp2 == greedy_tokens(path, 1, prompts, params, **overrides)
