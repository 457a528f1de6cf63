"""Worker ranks are programs of their own: tensor_parallel_count 2 works where multiprocessing's spawn cannot
re-import `__main__` (a script piped to `python -`, a script without a main guard), and a worker that dies
while starting fails the start at once, naming its rank and its error (not a rendezvous timeout)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ember import LLM, SamplingParams
from ember.errors import WorkerStartError

PROMPTS = [[5, 9, 17, 33, 8, 120], [100, 3, 4]]
HANG_GUARD_S = 240  # far below the 300 s rendezvous timeout a dead worker used to cost, far above a start

# no `if __name__ == "__main__":` on purpose: spawn would re-import this file (or fail to find `<stdin>`)
SCRIPT = """
import json
from ember import LLM, SamplingParams
llm = LLM({path!r}, tensor_parallel_count=2, device="cpu", dtype="float32")
outs = llm.generate({prompts!r}, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
print("TOKENS", json.dumps([o.token_ids for o in outs]))
llm.engine.shutdown()
"""


def _tp1_tokens(path) -> list[list[int]]:
    llm = LLM(str(path), tensor_parallel_count=1, device="cpu", dtype="float32")
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0,
                                                                          ignore_eos=True))]
    finally:
        llm.engine.shutdown()


def _tokens_from(proc: subprocess.CompletedProcess) -> list[list[int]]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("TOKENS "))
    return json.loads(line.removeprefix("TOKENS "))


@pytest.mark.parametrize("how", ["stdin", "unguarded_script"])
def test_tp2_without_main_guard(tiny_checkpoints, tmp_path, how):
    path = tiny_checkpoints["LlamaForCausalLM"]
    script = SCRIPT.format(path=str(path), prompts=PROMPTS)
    if how == "stdin":  # `python - < script.py`: __main__ has no file at all
        proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True,
                              timeout=HANG_GUARD_S, cwd=tmp_path)
    else:
        (tmp_path / "script.py").write_text(script)
        proc = subprocess.run([sys.executable, "script.py"], capture_output=True, text=True, timeout=HANG_GUARD_S,
                              cwd=tmp_path)
    assert _tokens_from(proc) == _tp1_tokens(path)


def _fault(tmp_path) -> dict:
    return {"rank": 1, "checkpoint_repository": {"source": "LOCAL", "repo": str(tmp_path / "no-such-shard")}}


def test_worker_start_failure_names_rank_and_error(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["LlamaForCausalLM"]
    with pytest.raises(WorkerStartError) as info:
        LLM(str(path), tensor_parallel_count=2, device="cpu", dtype="float32", fault_injection=_fault(tmp_path))
    msg = str(info.value)
    assert "worker rank 1" in msg and "exited with code 1 during start-up" in msg, msg
    assert "FileNotFoundError" in msg and "no-such-shard" in msg, msg


def test_serve_fails_when_a_worker_cannot_start(tiny_checkpoints, tmp_path):
    path = tiny_checkpoints["LlamaForCausalLM"]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({"model_name": "tiny", "trt_llm": {"build": {
        "checkpoint_repository": {"source": "LOCAL", "repo": str(path)}, "tensor_parallel_count": 2}},
        "ember": {"dtype": "float32", "device": "cpu", "port": 0, "fault_injection": _fault(tmp_path)}}))
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "serve", str(cfg)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()
    err = next(line for line in last if line.startswith("ember serve:"))
    assert "worker rank 1" in err and "FileNotFoundError" in err and "no-such-shard" in err, proc.stderr[-3000:]
