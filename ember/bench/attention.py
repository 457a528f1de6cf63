"""`ember bench attention`: the batched paged attention of decode and speculative steps, fused (one SDPA call,
what the CPU backend runs) against the matmul / softmax / matmul chain it replaced, per batch size.

Shapes are the model's (query heads, KV heads, head dim; the default model's if none is given); the KV cache is
paged and shuffled like a serving cache, each sequence a few tokens shorter than the longest so the per-step
mask is in play. Prints the time of one layer's call and the ratio chain / fused (above 1: fused is faster).
"""

from __future__ import annotations

import torch

from ember.bench.int4 import _time


def add_args(p) -> None:
    p.add_argument("model", nargs="?", default=None, help="config, model dir, .gguf or engine dir (default model)")
    p.add_argument("--batch-sizes", default="1,8,64", help="comma-separated sequences per step")
    p.add_argument("--seq-lens", default="160,1024", help="comma-separated KV lengths of the longest sequence")
    p.add_argument("--queries", default="1,8", help="comma-separated new tokens per sequence (1: decode; more: "
                   "a speculative chain under a causal mask)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)


def _head_shape(model_source) -> tuple[int, int, int]:
    from ember.checkpoint import load_checkpoint, resolve_checkpoint_path
    from ember.config import load_config

    cfg = load_checkpoint(resolve_checkpoint_path(load_config(model_source).trt_llm.build.checkpoint_repository)).hf_config
    hq = cfg.num_attention_heads
    return hq, getattr(cfg, "num_key_value_heads", None) or hq, getattr(cfg, "head_dim", None) or cfg.hidden_size // hq


def case(hq: int, hk: int, d: int, batch: int, seq_len: int, nq: int, block_size: int, dtype: torch.dtype):
    """(q [B * Q, Hq, D], a head-major paged cache, the step's BatchPlan) for one benchmark point."""
    from ember.layers.batched_attention import plan_batch

    nblk = -(-seq_len // block_size)
    num_blocks = batch * nblk + 1
    cache = torch.randn(2, hk, num_blocks, block_size, d, dtype=dtype).permute(0, 2, 3, 1, 4)  # head-major memory
    order = torch.randperm(num_blocks - 1)[: batch * nblk] + 1
    block_tables = order.to(torch.int32).view(batch, nblk)  # [B, nblk]
    seq_lens = [seq_len - (b % 5) for b in range(batch)]
    starts = [b * nq for b in range(batch + 1)]
    tree = torch.ones(batch * nq, nq, dtype=torch.bool).tril() if nq > 1 else None  # [T, Q] causal chain
    plan = plan_batch(list(range(batch)), starts, [nq] * batch, seq_lens, block_tables, block_size, tree, None,
                      dtype, "cpu")
    return torch.randn(batch * nq, hq, d, dtype=dtype), cache, plan


def main(args) -> None:
    from ember.layers.batched_attention import attend_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hq, hk, d = _head_shape(args.model)
    scale = d ** -0.5
    torch.manual_seed(0)
    print(f"heads {hq} (KV {hk}) x {d}, {args.dtype}, {torch.get_num_threads()} threads; one layer's call, ms")
    print(f"{'batch':>5} {'kv len':>6} {'queries':>7} {'chain':>8} {'fused':>8} {'chain/fused':>11} {'max |diff|':>10}")
    for nq in (int(x) for x in args.queries.split(",")):
        for seq_len in (int(x) for x in args.seq_lens.split(",")):
            for batch in (int(x) for x in args.batch_sizes.split(",")):
                q, cache, plan = case(hq, hk, d, batch, seq_len, nq, args.block_size, dtype)
                fused = attend_batch(q, cache, plan, scale, None, None)
                chain = attend_batch(q, cache, plan, scale, None, None, fused=False)
                diff = (fused.float() - chain.float()).abs().max().item()
                t_chain = _time(lambda: attend_batch(q, cache, plan, scale, None, None, fused=False), args.repeats)
                t_fused = _time(lambda: attend_batch(q, cache, plan, scale, None, None), args.repeats)
                print(f"{batch:>5} {seq_len:>6} {nq:>7} {t_chain * 1e3:>8.3f} {t_fused * 1e3:>8.3f} "
                      f"{t_chain / t_fused:>10.2f}x {diff:>10.2e}")
