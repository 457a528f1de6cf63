"""`ember bench offline --plot` and `--batch-sizes` on a tiny model: a real PNG (magic bytes, decodable, the size
matplotlib was asked for) of tok/s vs batch size, and the sweep's figures are consistent. The serve plot is
checked end to end in tests/e2e/test_e2e_bench_serve.py."""

from __future__ import annotations

import json

import pytest

from ember.bench import cli, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
        return im.size


def test_bench_offline_batch_sweep_plot(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "offline.png"
    assert cli.main(["offline", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "4", "--input-len", "8",
                     "--output-len", "3", "--batch-sizes", "1", "2", "--plot", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    points = res["batch_sweep"]
    assert [p["batch_size"] for p in points] == [1, 2]
    for p in points:
        assert p["ember_tok_s"] > 0 and p["baseline_tok_s"] > 0
        assert p["ratio"] == pytest.approx(p["ember_tok_s"] / p["baseline_tok_s"])
    assert png_size(out) == (1100, 450)  # two panels (tok/s, ratio) at 100 dpi


def test_bench_offline_plot_without_sweep(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "single.png"
    assert cli.main(["offline", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "2", "--input-len", "8",
                     "--output-len", "2", "--baseline", "none", "--plot", str(out)]) == 0
    assert "ember" in capsys.readouterr().out
    assert png_size(out) == (600, 450)  # one panel: no baseline, no ratio


def test_sweep_refuses_other_baselines(tiny_llama_dir, tmp_path):
    with pytest.raises(SystemExit, match="--batch-sizes compares against --baseline hf"):
        cli.main(["offline", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "2", "--input-len", "4",
                  "--output-len", "2", "--batch-sizes", "1", "--baseline", "vllm"])


def test_serve_plot_from_summaries(tmp_path):
    levels = [{"concurrency": c, "output_throughput": 10.0 * c,
               **{f"p{p}_{k}": float(p * c) for p in plots.PERCENTILES for k in ("ttft_ms", "tpot_ms", "e2el_ms")}}
              for c in (1, 2, 4)]
    plots.plot_serve(levels, str(tmp_path / "serve.png"), "tiny")
    assert png_size(tmp_path / "serve.png") == (1000, 700)


def test_bench_moe_runs_a_random_mixtral_against_transformers(capsys):
    assert cli.main(["moe", "--hidden-size", "32", "--intermediate-size", "32", "--num-layers", "1", "--vocab-size",
                     "300", "--batch-sizes", "1", "2", "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                     "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{"):])
    assert [p["batch_size"] for p in res["batch_sweep"]] == [1, 2]
    assert all(p["ratio"] == pytest.approx(p["ember_tok_s"] / p["baseline_tok_s"]) for p in res["batch_sweep"])
