"""ember on Ray Serve (ember.deploy.ray): a local Ray cluster with two CPU replicas of a tiny model behind Serve's
HTTP proxy. 32 concurrent requests through the official openai client reach both replicas; one replica is killed
mid-run and every request still completes (the client retries what the dead replica held, Serve routes the
retries to the live one and replaces the dead one), with nothing hanging."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="the ray extra (pip install ember[ray]) is not installed")

from ember.config import load_config  # noqa: E402
from ember.deploy import ray as ember_ray  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tiny_llama_dir):
    port = _free_port()
    config = load_config(str(tiny_llama_dir), dtype="float32", device="cpu").model_dump(mode="json")
    opts = ember_ray.RayServeOptions(num_replicas=2, num_cpus_per_replica=0.5)
    ember_ray.start(config, opts, host="127.0.0.1", port=port, num_cpus=2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ember_ray.stop()


async def _complete(client, i: int):
    raw = await client.completions.with_raw_response.create(
        model="tiny", prompt=f"request {i}: the", max_tokens=24, temperature=0.0)
    return raw.headers.get(ember_ray.REPLICA_HEADER), raw.parse()


def _replica_actors() -> list[dict]:
    """The deployment's replica actors by name (no dashboard here, so not ray.util.state)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{ember_ray.DEPLOYMENT_NAME}#" in a["name"]]


def test_two_replicas_share_the_load_and_survive_one_killed(ray_app):
    from openai import AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=ray_app + "/v1", api_key="x", max_retries=5, timeout=60.0)
        try:
            first = await asyncio.wait_for(asyncio.gather(*(_complete(client, i) for i in range(32))), 240)
            served_by = {tag for tag, _ in first}
            assert len(served_by) == 2, served_by
            assert all(out.choices[0].text and out.usage.completion_tokens > 0 for _, out in first)

            tasks = [asyncio.create_task(_complete(client, 100 + i)) for i in range(32)]
            await asyncio.sleep(0.5)  # requests in flight on both replicas
            victims = _replica_actors()
            assert len(victims) == 2
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]))
            second = await asyncio.wait_for(asyncio.gather(*tasks), 240)  # nothing hangs
            assert all(out.choices[0].text for _, out in second)  # every request completed
        finally:
            await client.close()

    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 480
