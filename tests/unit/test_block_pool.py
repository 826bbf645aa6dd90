"""BlockPool and KVCacheManager: reference counts, LRU eviction, prefix hits, integrity."""

from __future__ import annotations

import pytest

from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.block_pool import BlockPool, hash_block
from tokenmill.scheduler.kv_cache_manager import KVCacheManager


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), frozenset({2}), max_tokens=16, seed=0)


def test_hash_chain_depends_on_parent_and_tokens():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6])


def test_pool_allocates_frees_and_evicts_lru():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1] and pool.num_free_blocks == 1
    pool.cache_block(blocks[0], b"h0")
    pool.free_blocks(blocks)
    assert pool.num_free_blocks == 4
    assert pool.get_cached_block(b"h0") is blocks[0]  # freed but still cached
    pool.get_new_blocks(2)  # takes the never-used block 3 first, then block 0 (freed longest ago)
    assert pool.get_cached_block(b"h0") is None and blocks[0].block_hash is None
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(5)


def test_integrity_detects_a_leak():
    pool = BlockPool(2, enable_caching=False)
    held = pool.get_new_blocks(1)
    pool.check_integrity([held])
    with pytest.raises(AssertionError, match="ref_cnt 1 but held by 0"):
        pool.check_integrity([])


def test_prefix_hits_share_blocks_and_leave_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = _request("a", list(range(1, 11)))  # 10 tokens: 2 full blocks
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_blocks(first)
    second = _request("b", list(range(1, 9)) + [99])  # shares 8 tokens = 2 blocks
    hits, num_cached = kv.get_computed_blocks(second)
    assert num_cached == 8 and [b.block_id for b in hits] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(second, 1, hits)
    assert [b.ref_cnt for b in hits] == [2, 2]
    exact = _request("c", list(range(1, 9)))  # all 8 tokens cached: one must still be computed
    assert kv.get_computed_blocks(exact)[1] == 4
    kv.free(first)
    kv.free(second)
    kv.check_integrity()
    assert kv.num_free_blocks == 10


def test_allocation_fails_cleanly_when_out_of_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots(_request("a", [1] * 8), 8)
    assert not kv.allocate_slots(_request("b", [1] * 8), 8)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 1
    kv.check_integrity()


def test_free_hits_in_free_queue_count_against_availability():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = _request("a", list(range(1, 9)))
    assert kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_blocks(a)
    kv.free(a)  # both blocks free but cached
    b = _request("b", list(range(1, 9)) + list(range(50, 58)))  # hits 2 blocks, needs 2 more; only 1 other free
    hits, _ = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert not kv.allocate_slots(b, 8, hits)
    assert all(h.ref_cnt == 0 for h in hits)
    kv.check_integrity()
