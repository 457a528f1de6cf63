"""AsyncLLM: concurrent streams, abort frees KV blocks, queue bound, errors before the first output."""

import asyncio

import pytest

from ember import SamplingParams
from ember.engine.async_engine import AsyncLLM
from ember.engine.llm_engine import LLMEngine
from ember.errors import ContextLengthExceededError, QueueFullError


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from ember.config import load_config

    return LLMEngine(load_config(str(tiny_llama_dir), dtype="float32", max_queue_size=8))


def _run(coro):
    return asyncio.run(coro)


async def _collect(llm, rid, prompt, params):
    outs = [o async for o in llm.generate(prompt, params, rid)]
    return outs


def test_concurrent_streams_match_sync_results(engine):
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    expected = []
    for i, p in enumerate(prompts):
        engine.add_request(f"sync{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    expected = [done[f"sync{i}"] for i in range(3)]

    async def main():
        llm = AsyncLLM(engine=engine)
        await llm.start()
        results = await asyncio.gather(*(_collect(llm, f"a{i}", p, params) for i, p in enumerate(prompts)))
        await llm.shutdown()
        return results

    results = _run(main())
    for outs, exp in zip(results, expected):
        assert outs[-1].finished and outs[-1].token_ids == exp
        lens = [len(o.token_ids) for o in outs]
        assert lens == sorted(lens)  # cumulative outputs only grow


def test_abort_frees_blocks(engine):
    async def main():
        llm = AsyncLLM(engine=engine)
        await llm.start()
        free_before = engine.scheduler.block_manager.num_free_blocks
        agen = llm.generate([5] * 40, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "long")
        first = await agen.__anext__()
        assert not first.finished
        await agen.aclose()  # the consumer leaves: the engine must abort and free
        # a following request proves the engine thread has processed the abort
        await _collect(llm, "after", [5, 6], SamplingParams(max_tokens=2, temperature=0))
        free_after = engine.scheduler.block_manager.num_free_blocks
        await llm.shutdown()
        return free_before, free_after

    before, after = _run(main())
    assert after == before
    assert not engine.has_unfinished_requests()


def test_refusals_come_before_the_first_output(tiny_llama_dir):
    from ember.config import load_config

    engine = LLMEngine(load_config(str(tiny_llama_dir), dtype="float32", max_queue_size=8, max_batch_size=1))

    async def main():
        llm = AsyncLLM(engine=engine)
        await llm.start()
        with pytest.raises(ContextLengthExceededError):
            await _collect(llm, "big", [5] * 600, SamplingParams(max_tokens=10))
        started = []

        async def consume(i):
            async for _ in llm.generate([5, 6], SamplingParams(max_tokens=None, ignore_eos=True), f"q{i}"):
                started.append(i)

        tasks = [asyncio.ensure_future(consume(0))]
        while not started:  # q0 runs alone (max_batch_size=1) for ~500 steps
            await asyncio.sleep(0.01)
        tasks += [asyncio.ensure_future(consume(i)) for i in range(1, 9)]  # eight wait: the queue is full
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await _collect(llm, "overflow", [5, 6], SamplingParams(max_tokens=2))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(500):  # the engine thread picks the aborts up at its next step
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        await _collect(llm, "after", [5, 6], SamplingParams(max_tokens=2))  # aborts were processed
        await llm.shutdown()

    _run(main())
    assert not engine.has_unfinished_requests()
