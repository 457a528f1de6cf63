"""CUDA-graph decode replay == the eager forward, on a tiny random Llama (CUDA only), and bucket selection."""

from __future__ import annotations

import random

import pytest
import torch

from ember.worker.cuda_graphs import DEFAULT_BUCKETS, graph_buckets


def test_graph_buckets():
    assert graph_buckets(256) == DEFAULT_BUCKETS
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(10) == (1, 2, 4, 8, 16)
    assert graph_buckets(1000) == DEFAULT_BUCKETS + (1000,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.inference_mode()
def test_graph_replay_matches_eager():
    from ember.bench.gpu import build_models
    from ember.layers.attention import build_attention_metadata
    from ember.worker.cuda_graphs import CUDAGraphRunner
    from ember.worker.kv_cache import allocate_kv_caches

    dev = torch.device("cuda")
    model, _ = build_models("tiny", torch.float32, dev, with_hf=False)
    bs, num_blocks, width = 16, 64, 8
    caches = allocate_kv_caches(model.num_layers, num_blocks + 1, bs, model.num_kv_heads, model.head_dim,
                                torch.float32, dev)
    runner = CUDAGraphRunner(model, caches, block_size=bs, max_blocks_per_seq=width, pad_block_id=num_blocks,
                             buckets=(1, 2, 4, 8))
    runner.capture()
    assert sorted(runner.graphs) == [1, 2, 4, 8]

    rng = random.Random(0)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    lens = [5, 17, 40, 3, 33]
    tables = [ids[i * width:(i + 1) * width][: -(-(n + 4) // bs)] for i, n in enumerate(lens)]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lens]
    meta = build_attention_metadata(lens, lens, tables, bs, dev)
    model(torch.tensor(sum(prompts, []), device=dev), torch.tensor([p for n in lens for p in range(n)], device=dev),
          caches, meta)  # eager prefill fills the cache

    for seqs in ([0, 2, 4], [0, 1, 2, 3, 4], [1]):  # buckets 4 (one padding row), 8 (three), 1
        q_lens = [1] * len(seqs)
        s_lens = [lens[i] + 1 for i in seqs]
        tok = torch.tensor([rng.randrange(3, 500) for _ in seqs])
        pos = torch.tensor([lens[i] for i in seqs])
        sub_tables = [tables[i] for i in seqs]
        eager = model(tok.to(dev), pos.to(dev), caches,
                      build_attention_metadata(q_lens, s_lens, sub_tables, bs, dev)).clone()
        before = [c[:, :num_blocks].clone() for c in caches]
        run = runner.maybe_graph(build_attention_metadata(q_lens, s_lens, sub_tables, bs, "cpu"))
        assert run is not None
        graphed = run(tok, pos).clone()
        torch.cuda.synchronize()
        torch.testing.assert_close(graphed, eager, atol=1e-4, rtol=1e-4)
        for c, b in zip(caches, before):  # padding rows wrote only to the scratch block
            assert torch.equal(c[:, :num_blocks], b)
        # Device-side inputs take the same path.
        run = runner.maybe_graph(build_attention_metadata(q_lens, s_lens, sub_tables, bs, dev))
        torch.testing.assert_close(run(tok.to(dev), pos.to(dev)), eager, atol=1e-4, rtol=1e-4)

    # Steps that must run eagerly.
    assert runner.maybe_graph(build_attention_metadata([2], [6], [tables[0]], bs, "cpu")) is None  # prefill chunk
    assert runner.maybe_graph(build_attention_metadata([1] * 9, [2] * 9, [[0]] * 9, bs, "cpu")) is None  # > 8 seqs
    masked = build_attention_metadata([1], [6], [tables[0]], bs, "cpu")
    masked.tree_mask = torch.ones(1, 1, dtype=torch.bool)
    assert runner.maybe_graph(masked) is None
