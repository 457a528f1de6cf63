"""/metrics under the names an inference gateway reads (vllm:num_requests_waiting/running, vllm:kv_cache_usage_perc,
vllm:lora_requests_info), parsed with prometheus_client's own text parser from the real server: at rest, under a
queue of requests over two adapters with one running at a time, and after."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ember.config import load_config
from ember.engine.async_engine import AsyncLLM
from ember.server.app import create_app
from live_server import LiveServer, running

from .conftest import lora_config

GATEWAY = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
           "vllm:cache_config_info")
ADAPTERS = ("all-r4", "qv-r8")
NUM_REQUESTS = 4  # one runs, three wait: the queue lasts about 3 x 48 decode steps
POLL_S = 30.0  # a bound on waiting for a condition, never a synchronization sleep


@pytest.fixture(scope="module")
def server(lora_models):
    base, adapters = lora_models["llama"]
    raw = lora_config(base, {n: adapters[n] for n in ("all-r4", "qv-r8")}, max_loras=2)
    raw["trt_llm"]["build"].update(max_batch_size=1, max_seq_len=512)  # one runs, the others wait
    cfg = load_config(raw)
    engine = AsyncLLM(cfg)
    with running(LiveServer(create_app(engine, cfg), stop_timeout_s=30.0)) as live:
        live.engine = engine
        yield live


async def scrape(http: httpx.AsyncClient) -> dict[str, list]:
    """{family name: [(labels, value)]} for the gateway's families and ember's own gauges."""
    text = (await http.get("/metrics")).text
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def gauge(families: dict, name: str) -> float:
    [(labels, value)] = families[name]
    assert labels == {"model_name": "tiny"}
    return value


async def poll(http: httpx.AsyncClient, condition) -> dict:
    deadline = asyncio.get_running_loop().time() + POLL_S
    while True:
        families = await scrape(http)
        if condition(families) or asyncio.get_running_loop().time() > deadline:
            return families
        await asyncio.sleep(0.02)


def test_gateway_metrics_move_with_load(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            idle = await scrape(http)
            assert set(GATEWAY) <= set(idle)
            assert [gauge(idle, n) for n in GATEWAY[:3]] == [0.0, 0.0, 0.0]
            [(labels, stamp)] = idle["vllm:lora_requests_info"]
            assert labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""} and stamp > 0
            stats = server.engine.stats()
            assert idle["vllm:cache_config_info"] == [({"block_size": "16", "num_gpu_blocks": str(stats.num_blocks)}, 1.0)]

            # a queue of long requests over two adapters, one at a time (max_batch_size 1): the others wait
            body = {"prompt": "count", "max_tokens": 48, "ignore_eos": True}
            load = [asyncio.ensure_future(http.post("/v1/completions", json={**body, "model": ADAPTERS[i % 2]}))
                    for i in range(NUM_REQUESTS)]
            loaded = await poll(http, lambda f: f["vllm:lora_requests_info"][0][0]["waiting_lora_adapters"] != ""
                                and f["vllm:lora_requests_info"][0][0]["running_lora_adapters"] != "")
            [(labels, _)] = loaded["vllm:lora_requests_info"]
            assert labels["max_lora"] == "2" and labels["running_lora_adapters"] in ADAPTERS, labels
            assert set(labels["waiting_lora_adapters"].split(",")) <= set(ADAPTERS), labels
            assert gauge(loaded, "vllm:num_requests_running") == 1
            assert gauge(loaded, "vllm:num_requests_waiting") >= 1
            kv = gauge(loaded, "vllm:kv_cache_usage_perc")
            assert 0 < kv <= 1
            for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):  # one snapshot, two names
                assert gauge(loaded, f"vllm:{name}") == loaded[f"ember_{name}"][0][1]
            assert [r.status_code for r in await asyncio.gather(*load)] == [200] * NUM_REQUESTS
            after = await poll(http, lambda f: gauge(f, "vllm:num_requests_running") == 0 and gauge(f, "vllm:kv_cache_usage_perc") == 0)
            assert [gauge(after, n) for n in GATEWAY[:3]] == [0.0, 0.0, 0.0]
            assert after["vllm:lora_requests_info"][0][0]["running_lora_adapters"] == ""

    asyncio.run(main())
