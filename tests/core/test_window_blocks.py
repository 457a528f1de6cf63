"""The sliding layers' block pool (ember.core.window_blocks), torch-free: blocks wholly before the window of a
step's first query are released as the request advances, the global table keeps everything, an allocation needs
both pools, and a prefix hit adopts only the sliding blocks inside the window at its end."""

from core_fakes import make_req

from ember.core.block_manager import NULL_BLOCK, BlockManager
from ember.core.window_blocks import HybridBlockManager, WindowBlockManager


def _step(bm, req, n, prefix=None):
    assert bm.allocate_slots(req, n, prefix)
    bm.mark_computed()
    req.num_computed_tokens = (prefix.num_tokens if prefix else req.num_computed_tokens) + n


def test_window_releases_blocks_behind_the_window():
    bm = HybridBlockManager(BlockManager(32, 4), WindowBlockManager(8, 4, window=6))
    req = make_req("a", 40, max_tokens=1)
    for n in (8, 8, 8, 8, 8):  # chunked prefill of 40 tokens
        _step(bm, req, n)
        first_query = req.num_computed_tokens - n
        released = (first_query - 6 + 1) // 4 if first_query >= 6 else 0
        assert req.window_block_ids[:released] == [NULL_BLOCK] * released
        assert NULL_BLOCK not in req.window_block_ids[released:]
    assert len(req.block_ids) == 10 and NULL_BLOCK not in req.block_ids
    assert bm.window.num_held_blocks == 10 - 6  # blocks 6..9: the window of position 32 starts in block 6
    bm.free(req)
    assert bm.window.num_held_blocks == 0 and bm.num_free_blocks == 32


def test_an_allocation_needs_both_pools():
    bm = HybridBlockManager(BlockManager(32, 4), WindowBlockManager(3, 4, window=2))
    req = make_req("a", 16, max_tokens=1)
    assert not bm.allocate_slots(req, 16)  # 4 sliding blocks at once do not fit in 3
    assert req.block_ids == [] and req.window_block_ids == [] and bm.num_free_blocks == 32
    _step(bm, req, 8)
    _step(bm, req, 8)  # block 0 is released before the step's blocks are counted
    assert req.window_block_ids[0] == NULL_BLOCK and bm.window.num_held_blocks == 3


def test_prefix_hit_adopts_the_window_at_its_end():
    bm = HybridBlockManager(BlockManager(32, 4), WindowBlockManager(16, 4, window=6))
    a = make_req("a", 21, max_tokens=1)
    _step(bm, a, 21)
    b = make_req("b", list(a.prompt_token_ids), max_tokens=1)
    prefix = bm.get_computed_blocks(b)
    assert prefix.num_tokens == 20 and prefix.block_ids == a.block_ids[:5]
    # the first token after the prefix (position 20) sees positions 15..20: blocks 3 and 4 of the window table
    assert prefix.window.block_ids == [NULL_BLOCK] * 3 + a.window_block_ids[3:5]
    _step(bm, b, 1, prefix)
    assert b.window_block_ids[:3] == [NULL_BLOCK] * 3 and b.window_block_ids[3:5] == a.window_block_ids[3:5]
    bm.free(a)
    bm.free(b)
    c = make_req("c", list(a.prompt_token_ids), max_tokens=1)
    bm.window.reset_prefix_cache()  # the sliding blocks gone: no hit, though the global ones are cached
    assert bm.get_computed_blocks(c).num_tokens == 0
