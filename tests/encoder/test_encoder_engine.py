"""The encoder engine's batching: concurrent requests share token-budget batches and each gets its own rows."""

import asyncio

import torch

from ember.encoder.engine import EncoderEngine
from ember.encoder.runner import EncoderInput
from tests.encoder.conftest import encoder_config


def test_concurrent_requests_batch_by_tokens(bert_mean_dir):
    engine = EncoderEngine(encoder_config(bert_mean_dir))
    engine.max_num_tokens = 64  # a few sequences per batch
    requests = [[EncoderInput([2] + [5 + (i * 7 + j) % 60 for j in range(n)] + [3]) for n in (4, 20, 9)] for i in range(6)]
    batch_sizes = []
    run = engine.setup.runner.run
    engine.setup.runner.run = lambda batch: (batch_sizes.append((len(batch), sum(len(x.token_ids) for x in batch))), run(batch))[1]

    async def go():
        await engine.start()
        try:
            return await asyncio.gather(*(engine.encode(r) for r in requests))
        finally:
            await engine.shutdown()

    results = asyncio.run(go())
    for req, rows in zip(requests, results):
        torch.testing.assert_close(rows, run(req), atol=1e-5, rtol=1e-4)  # same rows as the request alone
    assert sum(n for n, _ in batch_sizes) == 18 and max(n for n, _ in batch_sizes) > 3  # requests shared batches
    assert all(t <= 64 or n == 1 for n, t in batch_sizes)  # within the token budget
    stats = engine.stats()
    assert stats.embeddings_total == 18 and stats.prompt_tokens_total == sum(len(x.token_ids) for r in requests for x in r)
