"""Sliding-window layers keep only their window: a second block table per request, from a pool of its own.

A model with both global and sliding-window layers (Gemma 3: five sliding layers per global one) gives its
sliding layers their own KV tensors, indexed by their own block ids. Each request then holds two tables:
`block_ids` (global layers, every position) and `window_block_ids` (sliding layers). The sliding table is
positional like the other, but a block whose positions all lie before the window of the step's first query
is released as soon as a step starts past it, and its entry becomes NULL_BLOCK: a long generation holds
about window / block_size sliding blocks, not its whole length. (The runner's copy of the row keeps the old
id there; attention masks those positions, so what it reads from that block, now someone else's, never counts.)

`HybridBlockManager` puts the two `BlockManager`s behind the one interface the scheduler uses: capacity,
admission and reserve are the global pool's (it is the one that grows with length); an allocation succeeds only
if both pools have the blocks. Prefix caching covers both: a cached prefix is used up to the longest length
whose global blocks are all cached and whose sliding blocks inside that length's window are too (the ones
before it are not needed: NULL_BLOCK).
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.core.block_manager import NULL_BLOCK, BlockManager, CachedPrefix
from ember.core.request import Request


class WindowBlockManager(BlockManager):
    """The sliding layers' pool: owns `req.window_block_ids` and releases blocks that fall out of the window.

    window: keys visible to the query at position p are p - window < k <= p (ember.layers.attention)."""

    def __init__(self, num_blocks: int, block_size: int, window: int, enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.window = window
        self._num_dropped: dict[str, int] = {}  # request id -> its leading entries already released

    def _table(self, req: Request) -> list[int]:
        return req.window_block_ids

    def _set_table(self, req: Request, block_ids: list[int]) -> None:
        req.window_block_ids = block_ids

    def num_outside(self, first_query_pos: int) -> int:
        """Leading blocks no query at or after `first_query_pos` can see."""
        return max(0, (first_query_pos - self.window + 1) // self.block_size)

    def allocate_slots(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        if prefix is None:  # a running request: what this step's queries cannot see goes back first
            self.drop(req, req.num_computed_tokens)
        if not super().allocate_slots(req, num_new_tokens, prefix):
            return False
        if prefix is not None:  # the adopted table starts with NULL_BLOCKs: count them as released
            self.drop(req, prefix.num_tokens)
        return True

    def drop(self, req: Request, first_query_pos: int) -> None:
        """Release the blocks wholly before the window of this step's first query."""
        table, done = req.window_block_ids, self._num_dropped.get(req.request_id, 0)
        end = min(self.num_outside(first_query_pos), len(table))
        if end <= done:
            return
        self._release(table[done:end])
        table[done:end] = [NULL_BLOCK] * (end - done)
        self._num_dropped[req.request_id] = end

    def free(self, req: Request) -> None:
        super().free(req)
        self._num_dropped.pop(req.request_id, None)

    def window_prefix(self, req: Request, num_blocks: int) -> CachedPrefix | None:
        """The sliding table of a prefix of `num_blocks` full blocks: NULL_BLOCK before the window of the first
        token after it, cached computed blocks inside it; None if one of those is not cached (or pending)."""
        hashes = self._block_hashes(req, num_blocks)
        out = CachedPrefix(num_tokens=num_blocks * self.block_size)
        first = self.num_outside(out.num_tokens)
        for i in range(num_blocks):
            if i < first:
                out.block_ids.append(NULL_BLOCK)
                continue
            block_id = self._cached.get(hashes[i])
            if block_id is None or not self.blocks[block_id].is_computed:
                return None
            out.block_ids.append(block_id)
        return out

    @property
    def num_held_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks


@dataclass
class HybridPrefix(CachedPrefix):
    """A prefix-cache hit of both tables (block_ids: the global table's)."""

    window: CachedPrefix | None = None


class HybridBlockManager:
    """The global layers' BlockManager and the sliding layers' WindowBlockManager as one (see the module doc)."""

    def __init__(self, full: BlockManager, window: WindowBlockManager):
        self.full, self.window = full, window
        self.block_size, self.enable_prefix_caching = full.block_size, full.enable_prefix_caching

    # capacity, admission and statistics: the global pool's
    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def blocks(self):
        return self.full.blocks

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def usage(self) -> float:
        return self.full.usage

    @property
    def num_prefix_queries(self) -> int:
        return self.full.num_prefix_queries

    @property
    def num_prefix_hits(self) -> int:
        return self.full.num_prefix_hits

    def num_blocks_for(self, num_tokens: int) -> int:
        return self.full.num_blocks_for(num_tokens)

    def get_computed_blocks(self, req: Request) -> HybridPrefix:
        found = self.full.get_computed_blocks(req)
        n = len(found.block_ids)
        while n > 0:  # the longest global hit whose sliding window is cached too
            window = self.window.window_prefix(req, n)
            if window is not None:
                return HybridPrefix(found.block_ids[:n], n * self.block_size, found.is_pending, window)
            n -= 1
        return HybridPrefix([], 0, found.is_pending, None)

    def allocate_slots(self, req: Request, num_new_tokens: int, prefix: HybridPrefix | None = None) -> bool:
        window_prefix = None if prefix is None else (prefix.window or CachedPrefix())
        if prefix is None:
            self.window.drop(req, req.num_computed_tokens)  # before counting what the step needs
        if self.window.num_blocks_to_allocate(req, num_new_tokens, window_prefix) > self.window.num_free_blocks:
            return False
        if not self.full.allocate_slots(req, num_new_tokens, prefix):
            return False
        ok = self.window.allocate_slots(req, num_new_tokens, window_prefix)
        assert ok, "the sliding pool was checked first"
        return True

    def mark_computed(self) -> None:
        self.full.mark_computed()
        self.window.mark_computed()

    def free(self, req: Request) -> None:
        self.full.free(req)
        self.window.free(req)

    def truncate(self, req: Request, num_tokens: int) -> None:
        self.full.truncate(req, num_tokens)
        self.window.truncate(req, num_tokens)

    def reset_prefix_cache(self) -> None:
        self.full.reset_prefix_cache()
        self.window.reset_prefix_cache()
