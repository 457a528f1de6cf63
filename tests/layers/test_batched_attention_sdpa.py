"""The batched attention's one SDPA call against its explicit matmul chain (the path soft-capping keeps), on
paged, shuffled caches with unequal lengths and speculative chains; and `ember bench attention` end to end."""

import pytest
import torch

from ember.bench.attention import case
from ember.layers.batched_attention import attend_batch


@pytest.mark.parametrize("batch,seq_len,nq", [(1, 40, 1), (5, 70, 1), (3, 50, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_the_matmul_chain(batch, seq_len, nq, dtype, tol):
    torch.manual_seed(0)
    q, cache, plan = case(6, 2, 16, batch, seq_len, nq, 16, dtype)
    fused = attend_batch(q, cache, plan, 0.25, None, None)
    chain = attend_batch(q, cache, plan, 0.25, None, None, fused=False)
    assert fused.shape == chain.shape == (batch * nq, 6, 16)
    assert torch.allclose(fused.float(), chain.float(), atol=tol, rtol=0)


def test_bench_attention_runs(capsys):
    from ember.bench.cli import main

    main(["attention", "--batch-sizes", "2", "--seq-lens", "40", "--queries", "1,3", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "chain/fused" in out and len([line for line in out.splitlines() if line.strip().startswith("2 ")]) == 2
