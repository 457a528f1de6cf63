"""Paged KV-cache bookkeeping: which fixed-size blocks each request holds, and the prefix cache.

A block holds the K/V of `block_size` consecutive token positions of one sequence. Blocks are
ref-counted so that requests with a common prefix share them. With prefix caching on, a block that is
FULL of known (non-draft) tokens gets a digest chained from its parent block's digest (and, for the
first block, the request's cache_salt), so equal digests mean equal prefixes (sha256: collisions are
not a practical concern, so no token comparison is needed). A block whose ref count drops to 0 keeps
its digest and stays in the free list, reusable by a later request, until a fresh block is needed and
it is evicted least-recently-freed first.

A digest is registered when the block is scheduled to be filled (`allocate_slots`) but counts as a
hit only once `mark_computed()` confirms that step ran: until then the block is *pending*, and a
lookup that runs into a pending block reports it so that the scheduler can wait a step rather than
read K/V that is not written yet (two requests with the same prompt added together, e.g. n > 1).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from ember.core.request import Request


NULL_BLOCK = -1  # a block-table entry whose block was released (outside a sliding window): never read


@dataclass
class Block:
    block_id: int  # index into the KV cache tensors' num_blocks dimension
    ref_count: int = 0  # requests holding it; 0: free (maybe still a cached prefix)
    block_hash: bytes | None = None  # prefix digest while it is registered in the prefix cache
    is_computed: bool = False  # its K/V has been written (a registered block is pending until then)


@dataclass
class CachedPrefix:
    """What a prefix-cache lookup found for a request that holds no blocks yet."""

    block_ids: list[int] = field(default_factory=list)  # computed blocks matching its leading tokens
    num_tokens: int = 0  # tokens they cover: len(block_ids) * block_size, always < request.num_tokens
    is_pending: bool = False  # the next block is being computed this step by another request: wait


def hash_block(parent: bytes | None, token_ids: list[int], cache_salt: str | None) -> bytes:
    """Digest of one full block: its tokens chained with the parent's digest (or the salt at the root)."""
    h = hashlib.sha256(parent if parent is not None else b"root:" + (cache_salt or "").encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Allocates KV blocks to requests and keeps the prefix cache. Never touches torch."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self._cached: dict[bytes, int] = {}  # digest -> block id (computed or pending)
        self._pending: list[int] = []  # blocks registered since the last mark_computed()
        self._num_registered: dict[str, int] = {}  # request id -> its leading blocks already registered
        self.num_prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens served from it

    def _table(self, req: Request) -> list[int]:
        """The request's block table this manager owns (a subclass may keep another one on the request)."""
        return req.block_ids

    def _set_table(self, req: Request, block_ids: list[int]) -> None:
        req.block_ids = block_ids

    # ---- capacity -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached prefixes among them are evictable, so they count)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_to_allocate(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> int:
        """Free-list blocks that allocate_slots(req, num_new_tokens, prefix) would consume."""
        held = len(prefix.block_ids) if prefix else len(self._table(req))
        start = prefix.num_tokens if prefix else req.num_computed_tokens
        fresh = max(0, self.num_blocks_for(start + num_new_tokens) - held)
        revived = sum(1 for b in prefix.block_ids if b != NULL_BLOCK and self.blocks[b].ref_count == 0) if prefix else 0
        return fresh + revived

    # ---- prefix cache -------------------------------------------------------------------------
    def get_computed_blocks(self, req: Request) -> CachedPrefix:
        """Longest cached prefix of a request holding no blocks; never all its tokens, since the last
        one must be computed to produce logits."""
        out = CachedPrefix()
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return out  # prompt logprobs need every prompt position computed: no prefix hits
        max_blocks = (req.num_tokens - 1) // self.block_size
        for h in self._block_hashes(req, max_blocks)[:max_blocks]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            if not self.blocks[block_id].is_computed:
                out.is_pending = True
                break
            out.block_ids.append(block_id)
        out.num_tokens = len(out.block_ids) * self.block_size
        return out

    def mark_computed(self) -> None:
        """The step that filled the blocks registered since the last call ran: they become hits."""
        for block_id in self._pending:
            block = self.blocks[block_id]
            if block.block_hash is not None:  # else freed meanwhile (abort): its digest was dropped
                block.is_computed = True
        self._pending.clear()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix not held by a request (e.g. after weights change)."""
        for block_id in self._free:
            self._uncache(self.blocks[block_id])

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[bytes]:
        hashes, bs, tokens = req.block_hashes, self.block_size, req.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs], req.cache_salt))
        return hashes

    def _register(self, req: Request, num_tokens: int) -> None:
        """Give digests to the request's blocks that are full of known tokens within num_tokens."""
        num_full = min(num_tokens, req.num_tokens) // self.block_size
        done = self._num_registered.get(req.request_id, 0)
        if num_full <= done:
            return
        hashes = self._block_hashes(req, num_full)
        table = self._table(req)
        for i in range(done, num_full):
            if table[i] == NULL_BLOCK:
                continue
            block = self.blocks[table[i]]
            # skip blocks adopted from the cache, and blocks equal to one cached already (computed in
            # parallel, e.g. n > 1 siblings sampling the same tokens): the first copy stays the hit
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash, block.is_computed = hashes[i], False
                self._cached[hashes[i]] = block.block_id
                self._pending.append(block.block_id)
        self._num_registered[req.request_id] = num_full

    def _uncache(self, block: Block) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash, block.is_computed = None, False

    # ---- allocation ---------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int, prefix: CachedPrefix | None = None) -> bool:
        """Make req.block_ids cover its computed tokens + num_new_tokens (adopting `prefix` first for
        a request that holds no blocks). All or nothing: False, and no change, if blocks run out."""
        if self.num_blocks_to_allocate(req, num_new_tokens, prefix) > len(self._free):
            return False
        start = req.num_computed_tokens
        if prefix is not None:
            assert not self._table(req), "a prefix is adopted only by a request holding no blocks"
            for block_id in prefix.block_ids:
                if block_id == NULL_BLOCK:
                    continue
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self._free[block_id]
                block.ref_count += 1
            self._set_table(req, list(prefix.block_ids))
            start = prefix.num_tokens
            self.num_prefix_queries += req.num_tokens
            self.num_prefix_hits += prefix.num_tokens
        table = self._table(req)
        for _ in range(self.num_blocks_for(start + num_new_tokens) - len(table)):
            block_id, _ = self._free.popitem(last=False)  # least recently freed
            block = self.blocks[block_id]
            self._uncache(block)  # evict whatever prefix it still held
            block.ref_count = 1
            table.append(block_id)
        if self.enable_prefix_caching:
            self._register(req, start + num_new_tokens)
        return True

    def free(self, req: Request) -> None:
        """Release all of a request's blocks (finish, abort or preemption)."""
        self._release(self._table(req))
        self._set_table(req, [])
        self._num_registered.pop(req.request_id, None)

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Keep only the blocks that cover the first num_tokens positions (speculative rollback)."""
        keep = self.num_blocks_for(num_tokens)
        table = self._table(req)
        if keep < len(table):
            self._release(table[keep:])
            del table[keep:]
            if self._num_registered.get(req.request_id, 0) > keep:
                self._num_registered[req.request_id] = keep

    def _release(self, block_ids: list[int]) -> None:
        # Tail blocks first, so a sequence's later blocks are evicted before its earlier ones.
        for block_id in reversed(block_ids):
            if block_id == NULL_BLOCK:
                continue
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count > 0:
                continue
            self._free[block_id] = None
            if block.block_hash is None or not block.is_computed:
                self._uncache(block)  # nothing reusable in it: evict it first
                self._free.move_to_end(block_id, last=False)
