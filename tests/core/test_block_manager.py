"""BlockManager: allocation, ref counts, prefix hits, pending blocks, LRU eviction, truncation."""

from core_fakes import make_req

from ember.core import BlockManager


def admit(bm: BlockManager, req, num_tokens=None, compute=True):
    """Look up, allocate for the rest of the known tokens, and (like a step) mark them computed."""
    prefix = bm.get_computed_blocks(req)
    n = (num_tokens or req.num_tokens) - prefix.num_tokens
    assert bm.allocate_slots(req, n, prefix)
    req.num_computed_tokens = prefix.num_tokens
    if compute:
        bm.mark_computed()
        req.num_computed_tokens += n
    return prefix


def test_allocate_free_and_usage():
    bm = BlockManager(8, 4)
    r = make_req("a", 10)
    assert bm.allocate_slots(r, 10)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5 and bm.usage == 3 / 8
    assert all(bm.blocks[b].ref_count == 1 for b in r.block_ids)
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2)  # fits in the third block
    assert len(r.block_ids) == 3
    assert bm.allocate_slots(r, 3)  # needs a fourth
    assert len(r.block_ids) == 4
    bm.free(r)
    assert r.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0


def test_allocation_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a, b = make_req("a", 8), make_req("b", 12)
    assert bm.allocate_slots(a, 8)
    assert not bm.allocate_slots(b, 12)
    assert b.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_never_whole_prompt():
    bm = BlockManager(16, 4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks
    a = make_req("a", prompt)
    admit(bm, a)
    b = make_req("b", prompt)
    prefix = admit(bm, b)
    assert prefix.num_tokens == 8 and prefix.block_ids == a.block_ids[:2]
    assert [bm.blocks[x].ref_count for x in a.block_ids] == [2, 2, 1]
    assert b.block_ids[2] != a.block_ids[2]
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (20, 8)
    c = make_req("c", prompt[:8])  # exactly two blocks: the last token must be computed
    assert bm.get_computed_blocks(c).num_tokens == 4


def test_pending_blocks_are_not_hits_until_computed():
    bm = BlockManager(16, 4)
    prompt = list(range(1, 11))
    a = make_req("a", prompt)
    admit(bm, a, compute=False)
    prefix = bm.get_computed_blocks(make_req("b", prompt))
    assert prefix.is_pending and prefix.num_tokens == 0
    bm.mark_computed()
    prefix = bm.get_computed_blocks(make_req("b", prompt))
    assert not prefix.is_pending and prefix.num_tokens == 8


def test_freed_pending_block_loses_its_hash():
    bm = BlockManager(16, 4)
    a = make_req("a", list(range(1, 11)))
    admit(bm, a, compute=False)
    bm.free(a)  # aborted before its step ran
    bm.mark_computed()
    prefix = bm.get_computed_blocks(make_req("b", list(range(1, 11))))
    assert prefix.num_tokens == 0 and not prefix.is_pending


def test_cache_salt_and_parent_chain_separate_prefixes():
    bm = BlockManager(32, 4)
    prompt = list(range(1, 11))
    admit(bm, make_req("a", prompt, salt="lora1"))
    assert bm.get_computed_blocks(make_req("b", prompt, salt="lora2")).num_tokens == 0
    assert bm.get_computed_blocks(make_req("c", prompt)).num_tokens == 0
    assert bm.get_computed_blocks(make_req("d", prompt, salt="lora1")).num_tokens == 8
    # same second block after a different first block: no hit at all
    other = [99, 98, 97, 96] + prompt[4:]
    assert bm.get_computed_blocks(make_req("e", other, salt="lora1")).num_tokens == 0


def test_freed_blocks_stay_cached_and_are_evicted_lru():
    bm = BlockManager(6, 4)
    a, b = make_req("a", list(range(1, 10))), make_req("b", list(range(50, 59)))  # 3 blocks each
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 6
    assert bm.get_computed_blocks(make_req("a2", a.all_token_ids)).num_tokens == 8
    # 3 fresh blocks: the never-full tail blocks go first (nothing cached in them), then a's (freed
    # before b's), its second block before its first
    c = make_req("c", list(range(200, 212)))
    assert bm.allocate_slots(c, 12)
    assert bm.get_computed_blocks(make_req("a3", a.all_token_ids)).num_tokens == 4
    assert bm.get_computed_blocks(make_req("b2", b.all_token_ids)).num_tokens == 8
    # reviving cached free blocks consumes the free list too
    prefix = bm.get_computed_blocks(make_req("b3", b.all_token_ids))
    b3 = make_req("b3", b.all_token_ids)
    assert bm.num_blocks_to_allocate(b3, 1, prefix) == 3
    assert bm.allocate_slots(b3, 1, prefix) and bm.num_free_blocks == 0


def test_truncate_releases_tail_blocks():
    bm = BlockManager(8, 4)
    r = make_req("a", 5)
    assert bm.allocate_slots(r, 14)  # 5 known + 9 drafts-worth of slots: 4 blocks
    tail = r.block_ids[2:]
    bm.truncate(r, 7)
    assert len(r.block_ids) == 2 and bm.num_free_blocks == 6
    assert all(bm.blocks[b].ref_count == 0 for b in tail)
    bm.truncate(r, 8)  # no-op
    assert len(r.block_ids) == 2


def test_prefix_caching_off_and_reset():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    admit(bm, make_req("a", list(range(1, 11))))
    assert bm.get_computed_blocks(make_req("b", list(range(1, 11)))).num_tokens == 0
    bm = BlockManager(16, 4)
    a = make_req("a", list(range(1, 11)))
    admit(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.get_computed_blocks(make_req("b", list(range(1, 11)))).num_tokens == 0
