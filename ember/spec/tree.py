"""Draft trees: the shape of a request's speculative tokens when they are not one chain.

A proposer hands the engine `spec_token_ids` (flat, topologically ordered) and, for trees, one parent
index per draft (-1: the request's last real token, the root). Draft i sits in the KV cache at slot
position `L + i` (L = position of the first draft, so the scheduler's block accounting is unchanged)
but is rotated at its logical position `L + depth(i)` and attends only to the committed context and
its own ancestors. The step's tree mask (`build_tree_mask`) holds every drafting request's rows (chains
causal), so decodes, chains and trees are verified in one batched attention call.

After verification the accepted path's K/V is moved to slot positions L, L+1, ... (where plain
decoding would have put it), and the scheduler truncates the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ember.layers.batched_attention import is_head_major


@dataclass
class SpecDecodeMetadata:
    """What the engine tells the runner about this step's drafts, besides request.spec_token_ids."""

    parents: dict[str, list[int]] = field(default_factory=dict)  # request id -> parent per draft (trees only)

    def tree(self, request_id: str, num_draft_tokens: int) -> list[int] | None:
        """Parents of the first num_draft_tokens drafts (the scheduler may cut the tail), or None: a chain."""
        p = self.parents.get(request_id)
        return None if p is None or not num_draft_tokens else p[:num_draft_tokens]


@dataclass
class SpecOutput:
    """Per request that verified drafts this step."""

    num_draft_tokens: int  # drafts that were run
    accepted_nodes: list[int]  # draft indices on the accepted path, root first
    node_argmax: list[int]  # argmax token at the root (row 0) and at each draft (row 1 + i)


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def depths(parents: list[int]) -> list[int]:
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def children(parents: list[int]) -> list[list[int]]:
    """Index 0: the root's children; index 1 + i: draft i's children (in draft order)."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        kids[p + 1].append(i)
    return kids


def rope_positions(start: int, num_new: int, num_draft: int, parents: list[int] | None) -> list[int]:
    """Logical positions of a chunk whose last num_draft tokens are drafts shaped by `parents`."""
    if parents is None:
        return list(range(start, start + num_new))
    first = start + num_new - num_draft
    return list(range(start, first)) + [first + d for d in depths(parents)]


def build_tree_mask(items: list, trees: list[list[int] | None]) -> torch.Tensor | None:
    """The step's `tree_mask` (ember.layers.attention.AttentionMetadata) [T, M] bool, M the longest query of
    a request with drafts, or None when no request has drafts (every sequence causal). Row t, column j:
    token t may attend new token j of its own sequence; ordinary tokens are causal, a tree draft sees the
    ordinary new tokens and its ancestors and itself. `items`: the step's ScheduledRequests in batch order."""
    width = max((it.num_new_tokens for it in items if it.num_draft_tokens), default=0)
    if not width:
        return None
    num_tokens = sum(it.num_new_tokens for it in items)
    mask = np.zeros((num_tokens, width), dtype=bool)
    tril = np.tril(np.ones((width, width), dtype=bool))
    start = 0
    for item, parents in zip(items, trees):
        n = item.num_new_tokens
        if n <= width:
            rows = mask[start:start + n]
            rows[:, :n] = tril[:n, :n]
            if parents is not None:
                first = n - len(parents)  # the drafts are the last len(parents) tokens
                tree = rows[first:, first:]  # [d, d] draft i's row: its ancestors and itself
                tree[:] = False
                for i, p in enumerate(parents):
                    if p >= 0:
                        tree[i] = tree[p]
                    tree[i, i] = True
        start += n
    return torch.from_numpy(mask)


def kv_moves(item, accepted_nodes: list[int], block_ids: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """(src, dst) flat slots that put the accepted path's K/V where plain decoding would have it.
    `block_ids`: the request's block table."""
    first = item.seq_len - item.num_draft_tokens
    src, dst = [], []
    for depth, node in enumerate(accepted_nodes):
        if node != depth:
            src.append(_slot(block_ids, first + node, block_size))
            dst.append(_slot(block_ids, first + depth, block_size))
    return src, dst


def _slot(block_ids: list[int], pos: int, block_size: int) -> int:
    return block_ids[pos // block_size] * block_size + pos % block_size


def copy_kv_slots(kv_caches: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
    """Copy K/V between flat slots in every layer's cache ([2, num_blocks, block_size, Hk, D])."""
    if not src:
        return
    dev = kv_caches[0].device
    s = torch.tensor(src, dtype=torch.int64, device=dev)
    d = torch.tensor(dst, dtype=torch.int64, device=dev)
    for cache in kv_caches:
        if is_head_major(cache):  # index the memory's own layout: contiguous rows of D
            phys = cache.permute(0, 3, 1, 2, 4)  # [2, Hk, num_blocks, block_size, D], contiguous
            flat = phys.reshape(2, phys.shape[1], -1, phys.shape[4])  # [2, Hk, slots, D], a view
            flat.index_copy_(2, d, flat.index_select(2, s))
        else:
            flat = cache.view(2, -1, cache.shape[3], cache.shape[4])  # [2, slots, Hk, D]
            flat.index_copy_(1, d, flat.index_select(1, s))
