"""`ember bench offline --baseline llamacpp`: the script llama-cpp-python runs, its result parsing and the
phase speeds, checked against a scripted stand-in `llama_cpp` module (llama-cpp-python lives in its own
interpreter, never in ember's); the real library runs when this interpreter has it."""

import importlib.util
import json
import os
import sys
import textwrap
from types import SimpleNamespace

import pytest

from ember.bench import llamacpp_baseline as lb

# A stand-in with llama-cpp-python's surface: greedy "sampling" returns (last token + 1) % 50, and every call
# is logged so the test sees what the script asked for.
_FAKE = textwrap.dedent('''
    import json, os

    class _Params:
        use_extra_bufts = True

    def llama_model_default_params():
        return _Params()

    class Llama:
        def __init__(self, model_path, **kw):
            params = llama_model_default_params()
            self.log = open(os.environ["FAKE_LLAMA_LOG"], "a", buffering=1)
            self.log.write(json.dumps({"init": model_path, "kw": kw, "extra": params.use_extra_bufts}) + "\\n")
            if params.use_extra_bufts and os.environ.get("FAKE_LLAMA_CRASH"):
                os.kill(os.getpid(), 11)  # what llama.cpp's AMX matmul does on some virtual machines
            self.tokens = []

        def reset(self):
            self.tokens = []

        def eval(self, tokens):
            self.tokens += list(tokens)

        def sample(self, temp, top_k):
            self.log.write(json.dumps({"sample": [temp, top_k]}) + "\\n")
            return (self.tokens[-1] + 1) % 50
''')


@pytest.fixture
def fake_llama(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from llama_cpp.llama_cpp import Llama\n")
    (pkg / "llama_cpp.py").write_text(_FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()]


def test_script_runs_greedy_prompts_and_reports_phases(fake_llama, tmp_path):
    prompts = [[3, 4, 5], [7, 8]]
    res = lb.run_llamacpp(tmp_path / "m.gguf", prompts, 5, None, 2)
    assert res["token_ids"] == [[6, 7, 8, 9, 10], [9, 10, 11, 12, 13]]
    assert res["output_tokens"] == 10 and res["use_extra_bufts"] is True
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["output_tok_s"] > 0
    calls = fake_llama()
    assert calls[0]["init"] == str(tmp_path / "m.gguf")
    assert calls[0]["kw"]["n_threads"] == 2 and calls[0]["kw"]["n_threads_batch"] == 2
    assert {tuple(c["sample"]) for c in calls if "sample" in c} == {(0.0, 1)}  # greedy only


def test_repeats_run_every_prompt_again(fake_llama, tmp_path):
    res = lb.run_llamacpp(tmp_path / "m.gguf", [[3, 4, 5], [7, 8]], 4, None, 2, repeats=3)
    assert res["token_ids"] == [[6, 7, 8, 9], [9, 10, 11, 12]]
    samples = [c for c in fake_llama() if "sample" in c]
    assert len(samples) == 4 + 3 * 2 * 4  # the 4-token warm-up, then three passes over both prompts


def test_crash_in_extra_buffers_retries_on_plain_ones(fake_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    res = lb.run_llamacpp(tmp_path / "m.gguf", [[1, 2]], 3, None, 2)
    assert res["use_extra_bufts"] is False and res["token_ids"] == [[3, 4, 5]]
    assert [c["extra"] for c in fake_llama() if "init" in c] == [True, False]


def test_summary_and_errors():
    raw = {"prefill_s": 0.5, "decode_s": 2.0, "token_ids": [[1] * 9]}
    res = lb.summarize(raw, [[0] * 10], 9)
    assert res["prefill_tok_s"] == 20.0 and res["decode_tok_s"] == 4.0 and res["output_tok_s"] == 9 / 2.5
    with pytest.raises(RuntimeError, match="ModuleNotFoundError: No module named 'llama_cpp'"):
        lb.parse_result("", "Traceback...\nModuleNotFoundError: No module named 'llama_cpp'\n", 1)


def test_gguf_of_checkpoint_or_engine_source(tmp_path):
    assert lb.gguf_of(SimpleNamespace(path=tmp_path / "a.gguf")) == tmp_path / "a.gguf"
    engine = SimpleNamespace(path=tmp_path, manifest={"build": {"source": {"path": "/m/b.gguf", "format": "gguf"}}})
    assert str(lb.gguf_of(engine)) == "/m/b.gguf"
    with pytest.raises(ValueError, match="--llamacpp-model"):
        lb.gguf_of(SimpleNamespace(path=tmp_path, manifest={}))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed here")
def test_real_llamacpp_on_default_model():
    from ember.checkpoint.default import default_model_path

    res = lb.run_llamacpp(default_model_path(), [[100, 200, 300, 400]], 4, sys.executable, 2)
    assert len(res["token_ids"][0]) == 4 and res["decode_tok_s"] > 0
