"""KV tiers on their own: the memory and disk stores (LRU, size limits, checksums), the byte rows the
runner packs blocks into, and the KV cache manager's saves and restores over a store."""

from __future__ import annotations

import struct

import pytest
import torch

from tokenmill.attention.kv_quant import make_kv_cache
from tokenmill.offload.disk_kv_tier import DiskBlockStore
from tokenmill.offload.kv_tiers import HostBlockStore, TieredBlockStore
from tokenmill.request import Request
from tokenmill.runner.kv_transfer import KVBlockTransfer
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.block_pool import hash_block
from tokenmill.scheduler.kv_cache_manager import KVCacheManager

ROW = 64  # bytes per block in the store tests


def _row(value: int) -> torch.Tensor:
    return torch.arange(ROW, dtype=torch.uint8) ^ value


def _key(i: int) -> bytes:
    return hash_block(None, [i])


def test_the_memory_tier_evicts_the_least_recently_used_block_into_the_next():
    spilled = HostBlockStore(10 * ROW, ROW, pin=False)
    tier = HostBlockStore(2 * ROW + ROW // 2, ROW, pin=False, next_tier=spilled)  # room for 2 blocks
    assert tier.capacity_blocks == 2
    tier.put(_key(0), _row(0))
    tier.put(_key(1), _row(1))
    assert torch.equal(tier.get(_key(0)), _row(0))  # block 0 is now the most recently used
    tier.put(_key(2), _row(2))  # evicts block 1
    assert [tier.contains(_key(i)) for i in range(3)] == [True, False, True]
    assert len(tier) == 2 and tier.evictions == 1 and tier.stores == 3 and tier.hits == 1
    assert spilled.contains(_key(1)) and torch.equal(spilled.get(_key(1)), _row(1))
    view = tier.get(_key(2))  # valid until the next put, which may give its slot to another block
    tier.put(_key(3), _row(3))  # evicts block 0 (block 2 was used more recently)
    assert torch.equal(view, _row(2)) and not tier.contains(_key(0))
    assert tier.get(_key(7)) is None


def test_a_memory_tier_smaller_than_a_block_is_refused():
    with pytest.raises(ValueError, match="kv_offload_memory 63 bytes holds no KV block of 64 bytes"):
        HostBlockStore(63, ROW, pin=False)


def test_the_disk_tier_keeps_within_its_space_and_reads_back_what_it_wrote(tmp_path):
    file_bytes = ROW + 52  # the header is 52 bytes
    store = DiskBlockStore(tmp_path, 3 * file_bytes, ROW)
    assert store.capacity_blocks == 3
    for i in range(5):
        store.put(_key(i), _row(i))
    assert torch.equal(store.get(_key(4)), _row(4))  # served while its write may still be queued
    store.flush()
    files = list(store.folder.glob("*.kv"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 3 * file_bytes
    assert store.evictions == 2 and not store.contains(_key(0)) and not store.contains(_key(1))
    for i in (2, 3, 4):
        assert torch.equal(store.get(_key(i)), _row(i))
    assert store.hits == 4 and store.failures == 0
    folder = store.folder
    store.close()
    assert not folder.exists()


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap_in_other_block(path, other):
    path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("damage", ["flip a payload byte", "delete the file", "truncate the file",
                                    "another block's file", "a wrong length"])
def test_a_damaged_disk_block_is_detected_and_dropped(damage, tmp_path):
    store = DiskBlockStore(tmp_path, 10**6, ROW)
    store.put(_key(0), _row(0))
    store.put(_key(1), _row(1))
    store.flush()
    path = store.path(_key(0))
    if damage == "flip a payload byte":
        _flip_payload_byte(path)
    elif damage == "delete the file":
        path.unlink()
    elif damage == "truncate the file":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "another block's file":
        _swap_in_other_block(path, store.path(_key(1)))
    else:
        data = path.read_bytes()
        magic, block_hash, _, crc = struct.unpack("<8s32sQI", data[:52])
        path.write_bytes(struct.pack("<8s32sQI", magic, block_hash, ROW - 1, crc) + data[52:])
    assert store.get(_key(0)) is None
    assert store.failures == 1 and not store.contains(_key(0)) and len(store) == 1
    store.flush()
    assert not path.exists()  # the bad file is removed
    assert torch.equal(store.get(_key(1)), _row(1))
    store.close()


def test_tiers_fall_through_to_the_disk_copy(tmp_path):
    disk = DiskBlockStore(tmp_path, 10**6, ROW)
    store = TieredBlockStore([HostBlockStore(ROW, ROW, pin=False, next_tier=disk), disk])
    store.put(_key(0), _row(0))
    store.put(_key(1), _row(1))  # pushes block 0 to disk
    assert store.contains(_key(0)) and not store.tiers[0].contains(_key(0))
    assert torch.equal(store.get(_key(0)), _row(0)) and disk.hits == 1
    assert [s.name for s in store.stats()] == ["cpu", "disk"]
    store.close()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8_e4m3"])
def test_a_block_row_is_every_layers_cache_slice_and_writes_back_exactly(kv_cache_dtype):
    torch.manual_seed(0)
    shape = (2, 6, 4, 2, 8)  # (2, num_blocks, block_size, nkv, d)
    caches = [make_kv_cache(kv_cache_dtype, shape, torch.float32, torch.device("cpu")) for _ in range(3)]
    for cache in caches:  # random contents, scales included
        for t in ([cache] if isinstance(cache, torch.Tensor) else [cache.codes] + (
                [cache.scales] if isinstance(cache.scales, torch.Tensor) else [])):
            t.view(torch.uint8).random_(0, 256) if t.dtype != torch.float16 else t.uniform_(0.5, 2.0)
    transfer = KVBlockTransfer(caches, torch.device("cpu"))
    rows = transfer.read([4, 1])
    per_layer = {"auto": 2 * 4 * 2 * 8 * 4, "int8": 2 * 4 * 2 * (8 + 2), "fp8_e4m3": 2 * 4 * 2 * 8}
    expected_width = 3 * per_layer[kv_cache_dtype]
    assert rows.shape == (2, expected_width) == (2, transfer.bytes_per_block)

    def block_bytes(block: int) -> bytes:  # an independent packing: layer by layer, K then V, codes then scales
        out = b""
        for cache in caches:
            tensors = [cache] if isinstance(cache, torch.Tensor) else [cache.codes] + (
                [cache.scales] if isinstance(cache.scales, torch.Tensor) else [])
            for t in tensors:
                out += t[:, block].contiguous().view(torch.uint8).numpy().tobytes()
        return out

    assert rows[0].numpy().tobytes() == block_bytes(4) and rows[1].numpy().tobytes() == block_bytes(1)
    transfer.write([0, 5], rows)
    assert block_bytes(0) == block_bytes(4) and block_bytes(5) == block_bytes(1)


class _DictStore:
    """A store as the manager sees it; ``bad`` hashes read back as corrupt."""

    def __init__(self):
        self.blocks: dict[bytes, object] = {}
        self.bad: set[bytes] = set()

    def contains(self, block_hash):
        return block_hash in self.blocks

    def get(self, block_hash):
        return None if block_hash in self.bad else self.blocks.get(block_hash)


def _request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id=request_id, prompt_token_ids=tokens, sampling_params=SamplingParams(max_tokens=4),
                   eos_token_ids=frozenset(), max_tokens=4, seed=0)


def _run_prefill(kv: KVCacheManager, request: Request) -> None:
    assert kv.allocate_slots(request, request.num_tokens)
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)


def test_the_manager_saves_evicted_blocks_and_restores_a_prefix_from_the_store():
    store = _DictStore()
    kv = KVCacheManager(num_blocks=4, block_size=2, block_store=store)
    first = _request("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks + 1 token
    _run_prefill(kv, first)
    first_blocks = kv.block_ids("a")
    hashes = kv._hashes(first, 3)
    kv.free(first)
    saves, loads = kv.take_kv_transfers()
    assert saves == [] and loads == []
    other = _request("b", [9, 9, 9, 9, 9, 9, 9, 9])  # takes all 4 blocks: evicts first's 3 cached blocks
    _run_prefill(kv, other)
    saves, _ = kv.take_kv_transfers()
    assert sorted(saves) == sorted(zip(first_blocks[:3], hashes))
    for block_id, block_hash in saves:  # what the runner does: the block's bytes into the store
        store.blocks[block_hash] = f"bytes of block {block_id}"
    kv.free(other)

    again = _request("c", [1, 2, 3, 4, 5, 6, 7, 8])
    computed, num_cached = kv.get_computed_blocks(again)
    assert computed == [] and num_cached == 0  # the pool lost them
    found = kv.find_in_tiers(again, 0)
    assert found == hashes  # 3 blocks; the 4th is not full in the first request
    assert kv.allocate_slots(again, 8)
    assert kv.restore_from_tiers(again, 0, found) == 6
    _, loads = kv.take_kv_transfers()
    assert [(b, store.blocks[h]) for b, h in zip([blk.block_id for blk in kv.req_blocks["c"][:3]], hashes)] == loads
    assert [kv.pool.get_cached_block(h) for h in hashes] == kv.req_blocks["c"][:3]  # registered for others
    kv.free(again)
    kv.check_integrity()


def test_a_block_that_fails_its_check_ends_the_restore_and_an_evicted_restore_is_not_loaded():
    store = _DictStore()
    kv = KVCacheManager(num_blocks=6, block_size=2, block_store=store)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    probe = _request("probe", tokens)
    hashes = kv._hashes(probe, 3)
    for h in hashes:
        store.blocks[h] = h
    store.bad.add(hashes[1])
    request = _request("a", tokens)
    assert kv.allocate_slots(request, 7)
    assert kv.restore_from_tiers(request, 0, kv.find_in_tiers(request, 0)) == 2  # block 0 only
    kv.free(request)  # its restored block 0 is cached and free, its load still queued
    taker = _request("b", [8] * 12)
    assert kv.allocate_slots(taker, 12)  # takes every block, block 0's included
    saves, loads = kv.take_kv_transfers()
    assert loads == [] and saves == []  # the load is dropped, and the store still has the block: no save
    kv.free(taker)
    kv.check_integrity()
