"""`ember bench serve` against the real server: every request completes with its fixed output
length and the figures are consistent (percentiles ordered, throughput = tokens / duration)."""

from __future__ import annotations

import math

import pytest

from e2e_server import real_server, wait_until
from ember.bench import cli, serve


@pytest.fixture(scope="module")
def server():
    with real_server() as s:
        yield s


def test_percentile_matches_numpy_linear():
    assert serve.percentile([], 50) is None
    assert serve.percentile([3.0], 99) == 3.0
    assert serve.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert serve.percentile(list(range(101)), 90) == pytest.approx(90.0)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve(server, endpoint, capsys, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_args(parser)
    args = parser.parse_args(["--url", f"{server.url}/v1", "--endpoint", endpoint, "--concurrency", "1", "3",
                              "--num-prompts", "3", "--input-len", "12", "--output-len", "5", "--slo-ttft-ms", "1e9",
                              "--slo-tpot-ms", "1e9", "--plot", str(tmp_path / "plot.png")])
    res = serve.main(args)
    table = capsys.readouterr().out
    assert "TTFT p99 (ms)" in table and "output throughput (tok/s)" in table
    assert res["model"] == server.model and [s["concurrency"] for s in res["levels"]] == [1, 3]
    for s in res["levels"]:
        assert (s["completed"], s["failed"]) == (3, 0), s["errors"]
        assert s["total_output_tokens"] == 15
        if endpoint == "completions":  # token-id prompts of exactly --input-len
            assert s["total_input_tokens"] == 36
        assert s["output_throughput"] == pytest.approx(15 / s["duration_s"])
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # every request meets a huge SLO
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            p50, p90, p99 = (s[f"p{p}_{key}"] for p in (50, 90, 99))
            assert 0 < p50 <= p90 <= p99 and math.isfinite(s[f"mean_{key}"])
        assert s["p99_ttft_ms"] <= s["p99_e2el_ms"]
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is a dependency
    assert wait_until(server.is_idle)


def test_registered_in_cli(server, capsys):
    assert cli.main(["serve", "--url", f"{server.url}/v1", "--num-prompts", "1", "--output-len", "2", "--input-len", "4", "--json"]) == 0
    assert '"completed": 1' in capsys.readouterr().out
