"""BlockPool: the KV cache's blocks, their reference counts, the free queue and the prefix-cache map.

A block is *free* when no request holds it (ref_cnt 0). A free block may still hold the K/V of
a full block that was hashed into the prefix cache: it stays findable by its hash until it is
handed out again. The free queue is ordered for LRU eviction: blocks freed longest ago are
reused first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence


def hash_block(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """SHA-256 of (parent block's hash, this block's token ids): equal hashes mean equal prefixes."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    """Set while the block is registered in the prefix cache."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool,
                 on_evict: Callable[[KVBlock, bytes], None] | None = None):
        """``on_evict(block, block_hash)`` is called when a cached block is handed out again (its contents
        are about to be overwritten): a KV tier saves them first."""
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Takes ``num_blocks`` free blocks (evicting their cached contents) with ref_cnt 1 each."""
        if num_blocks > len(self.free_queue):
            raise RuntimeError(f"asked for {num_blocks} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(num_blocks):
            block = self.blocks[self.free_queue.popitem(last=False)[0]]
            if block.block_hash is not None:
                del self.cached[block.block_hash]
                if self.on_evict is not None:
                    self.on_evict(block, block.block_hash)
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drops one reference from each block; blocks reaching 0 join the free queue in this order."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
        """Registers a full block under its hash (the first block with a given hash wins)."""
        if self.enable_caching and block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def evict_cached_free_blocks(self) -> int:
        """Evicts every cached block that no request holds, as reuse would (``on_evict`` first); returns how
        many. The blocks stay free, no longer findable by hash."""
        evicted = [block for block in self.cached.values() if block.ref_cnt == 0]
        for block in evicted:
            del self.cached[block.block_hash]
            if self.on_evict is not None:
                self.on_evict(block, block.block_hash)
            block.block_hash = None
        return len(evicted)

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def check_integrity(self, block_tables: Iterable[Sequence[KVBlock]]) -> None:
        """Raises AssertionError unless ref counts equal table membership and the free queue is exact."""
        counts = [0] * self.num_blocks
        for table in block_tables:
            for block in table:
                counts[block.block_id] += 1
        for block in self.blocks:
            assert block.ref_cnt == counts[block.block_id], \
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but held by {counts[block.block_id]} tables"
            assert (block.ref_cnt == 0) == (block.block_id in self.free_queue), \
                f"block {block.block_id}: ref_cnt {block.ref_cnt} but free-queue membership disagrees"
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, f"block {block.block_id}: prefix-cache map out of date"
