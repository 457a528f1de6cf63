"""`ember check` through a real subprocess: exit 0 and the normalized YAML for good configs, exit 2 and
one field-naming line on stderr for bad ones. No weights are loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

CONFIGS = Path(__file__).parent / "configs"


def _ember(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=60)


def test_check_good_config_prints_normalized_yaml():
    proc = _ember("check", str(CONFIGS / "qwen-coder-lookahead.yaml"))
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert out["trt_llm"]["build"]["speculator"]["lookahead_ngram_size"] == 8
    assert out["trt_llm"]["build"]["max_beam_width"] == 1  # defaults filled in
    assert out["model_metadata"]["repo_id"] == "Qwen/Qwen2.5-Coder-32B-Instruct"  # Truss keys kept


def test_check_bad_config_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trt_llm:\n  build:\n    quantization_type: fp7\n    max_seq_len: 4096\n")
    proc = _ember("check", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "trt_llm.build.quantization_type: 'fp7' is not one of no_quant" in lines[0]

    bad.write_text("trt_llm:\n  build:\n    checkpoint_repository:\n      source: GCS\n      repo: gs://b/m\n")
    proc = _ember("check", str(bad))
    assert proc.returncode == 2
    assert "trt_llm.build.checkpoint_repository.source: 'GCS' is not supported here" in proc.stderr

    proc = _ember("check", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


def test_check_redacts_api_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ember:\n  api_key: sk-secret\n")
    proc = _ember("check", str(cfg))
    assert proc.returncode == 0 and "sk-secret" not in proc.stdout


def test_usage_errors_exit_2():
    assert _ember("check").returncode == 2  # missing argument (argparse)
    assert _ember("nonsense").returncode == 2
