"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a large model on a GPU is a few hundred small kernels; launching them from Python costs
more than running them at small batch. `CUDAGraphRunner` captures the model's forward for all-decode
batches of each bucket size (1, 2, 4, ... 256) over static input buffers, and replays the graph of the
smallest bucket that fits: the step's inputs are packed into one pinned host row per sequence
`[input_id, position, slot, seq_len, block ids...]`, copied to the device with one non-blocking copy, and
the graph itself unpacks them into the typed buffers the model reads. Rows beyond the real batch are
padding: they attend to one position of a scratch block (`pad_block_id`, one block the runner allocates
beyond those the block manager hands out) and write their K/V there, so they never touch a sequence's cache.

Only all-decode batches without a custom mask are graphed (prefill chunks and speculative verification
run eagerly). Nothing in `maybe_graph` or a replay waits on the device; the caller's only sync stays the
sampled tokens. The hidden states a replay returns are a view of the graph's static output, valid until
the next replay.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

from ember.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_NUM_FIXED_COLS = 4  # input_id, position, slot, seq_len; block ids follow


class CUDAGraphRunner:
    """Captures `model.forward` for all-decode batches per bucket and replays it from static buffers."""

    def __init__(self, model, kv_caches: list[torch.Tensor], *, block_size: int, max_blocks_per_seq: int,
                 pad_block_id: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model = model
        self.kv_caches = kv_caches
        self.device = kv_caches[0].device
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.buckets = tuple(sorted(buckets))
        self.max_batch = self.buckets[-1]
        self.max_seq_len = max_blocks_per_seq * block_size
        num_cols = _NUM_FIXED_COLS + max_blocks_per_seq
        dev, i64, i32 = self.device, torch.int64, torch.int32
        # One padding row: token 0 at position 0, KV written to and read from the scratch block only.
        self.pad_row = torch.zeros(num_cols, dtype=i64)
        self.pad_row[2] = pad_block_id * block_size
        self.pad_row[3] = 1
        self.pad_row[_NUM_FIXED_COLS:] = pad_block_id
        self.pad_row_dev = self.pad_row.to(dev)
        self.host_stage = self.pad_row.repeat(self.max_batch, 1).pin_memory()  # [max_batch, cols] pinned
        self.dev_stage = self.host_stage.to(dev)  # [max_batch, cols]: the graphs' only input
        self.copy_done: torch.cuda.Event | None = None  # the host stage is reusable once its copy has run
        # Typed static buffers the captured forward reads (filled from dev_stage inside the graph).
        self.input_ids = torch.zeros(self.max_batch, dtype=i64, device=dev)  # [max_batch]
        self.positions = torch.zeros(self.max_batch, dtype=i64, device=dev)  # [max_batch]
        self.slot_mapping = torch.zeros(self.max_batch, dtype=i64, device=dev)  # [max_batch]
        self.seq_lens = torch.ones(self.max_batch, dtype=i32, device=dev)  # [max_batch]
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=i32, device=dev)  # [max_batch + 1]: one token each
        self.block_tables = torch.zeros(self.max_batch, max_blocks_per_seq, dtype=i32, device=dev)  # [max_batch, W]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, hidden [n, H])

    # ---- capture --------------------------------------------------------------------------------
    def _metadata(self, n: int) -> AttentionMetadata:
        """Metadata over the first n static rows; its python sizes are the bucket's worst case."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:n], query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n], seq_lens_list=[self.max_seq_len] * n, query_lens_list=[1] * n,
            block_tables=self.block_tables[:n], max_query_len=1, max_seq_len=self.max_seq_len, is_all_decode=True,
        )

    def _forward(self, n: int) -> torch.Tensor:
        stage = self.dev_stage[:n]  # [n, cols]
        self.input_ids[:n].copy_(stage[:, 0])
        self.positions[:n].copy_(stage[:, 1])
        self.slot_mapping[:n].copy_(stage[:, 2])
        self.seq_lens[:n].copy_(stage[:, 3])
        self.block_tables[:n].copy_(stage[:, _NUM_FIXED_COLS:])
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, self._metadata(n))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its memory pool. On failure (an
        op in the forward that cannot be captured) graphs stay off and every step runs eagerly."""
        try:
            pool = None
            for n in reversed(self.buckets):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up: compiles kernels, settles the allocator
                    for _ in range(2):
                        self._forward(n)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._forward(n)  # [n, H]
                pool = graph.pool() if pool is None else pool
                self.graphs[n] = (graph, hidden)
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            logger.warning("CUDA graph capture failed (%s); decode steps run eagerly", e)
            self.graphs.clear()

    # ---- replay ---------------------------------------------------------------------------------
    def maybe_graph(self, meta: AttentionMetadata) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """A replay function for this step, or None when it must run eagerly.

        The returned `run(input_ids [B], positions [B]) -> hidden [B, H]` takes its inputs (and `meta`'s
        slot_mapping / seq_lens / block_tables) on the host, ideally, or on the device.
        """
        if not self.graphs or not meta.is_all_decode or meta.tree_mask is not None:
            return None
        n = meta.num_seqs
        if n == 0 or n > self.max_batch or meta.block_tables.shape[1] > self.max_blocks:
            return None
        bucket = next(b for b in self.buckets if b >= n)
        return functools.partial(self._replay, meta, bucket)

    def _replay(self, meta: AttentionMetadata, bucket: int, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        n, width = meta.num_seqs, meta.block_tables.shape[1]
        fields = (input_ids, positions, meta.slot_mapping, meta.seq_lens)
        on_host = all(t.device.type == "cpu" for t in (*fields, meta.block_tables))
        if on_host:
            if self.copy_done is not None:
                self.copy_done.synchronize()  # the previous step's copy finished long ago; never waits in practice
            stage = self.host_stage
        else:
            stage = self.dev_stage
        for col, t in enumerate(fields):
            stage[:n, col].copy_(t)
        stage[:n, _NUM_FIXED_COLS:_NUM_FIXED_COLS + width].copy_(meta.block_tables)
        if bucket > n:
            stage[n:bucket].copy_((self.pad_row if on_host else self.pad_row_dev).expand(bucket - n, -1))
        if on_host:
            self.dev_stage[:bucket].copy_(self.host_stage[:bucket], non_blocking=True)
            if self.copy_done is None:
                self.copy_done = torch.cuda.Event()
            self.copy_done.record()
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:n]


def graph_buckets(max_batch_size: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets worth capturing for an engine whose batches never exceed `max_batch_size`."""
    kept = tuple(b for b in buckets if b < max_batch_size)
    return kept + (next((b for b in buckets if b >= max_batch_size), max_batch_size),)
