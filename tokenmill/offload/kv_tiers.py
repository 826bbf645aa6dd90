"""KV-cache tiers: where full prefix-cache blocks go when the device pool evicts them.

A block's contents travel as one flat byte row (every layer's K and V, and scales where the cache is
quantized; ``runner/kv_transfer.py`` packs and unpacks it), keyed by the block's prefix hash (the
SHA-256 chain of ``block_pool.hash_block``: equal hashes mean equal token prefixes).

- ``HostBlockStore``: a slab of CPU memory (pinned on CUDA) with a slot per block;
- ``DiskBlockStore`` (``disk_kv_tier.py``): a file per block in a folder, checksummed;
- ``TieredBlockStore``: the tiers in order, fastest first; a tier full of blocks hands its least
  recently used one to the next tier (the last tier drops it).

The KV cache manager asks ``contains`` while matching a prompt's prefix and ``get`` once the request
has blocks to load into; the model runner ``put``s the blocks the pool evicts, before they are
overwritten. A ``get`` that finds a block missing or corrupt returns None, and the prefix is
recomputed from there.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from tokenmill.logger import get_logger
from tokenmill.offload.block_store import BlockStore, KVTierStats
from tokenmill.offload.disk_kv_tier import DiskBlockStore

logger = get_logger(__name__)


class HostBlockStore(BlockStore):
    """Blocks in one preallocated CPU tensor (capacity_blocks, bytes_per_block), pinned on CUDA so that
    copies to the GPU run at the host link's speed."""

    def __init__(self, memory: int, bytes_per_block: int, pin: bool, next_tier: BlockStore | None = None):
        super().__init__()
        self.capacity_blocks = memory // bytes_per_block
        if self.capacity_blocks < 1:
            raise ValueError(f"kv_offload_memory {memory} bytes holds no KV block of {bytes_per_block} bytes; "
                             f"give at least {bytes_per_block}")
        self.name, self.bytes_per_block, self.next_tier = "cpu", bytes_per_block, next_tier
        self.location = "pinned CPU memory" if pin else "CPU memory"
        self.slab = torch.empty(self.capacity_blocks, bytes_per_block, dtype=torch.uint8, pin_memory=pin)
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # hash -> slot, least recently used first
        self.free_slots = list(range(self.capacity_blocks - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.slots)

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self.slots

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        slot = self.slots.get(block_hash)
        if slot is None:
            return None
        self.slots.move_to_end(block_hash)
        self.hits += 1
        return self.slab[slot]

    def put(self, block_hash: bytes, data: torch.Tensor) -> None:
        if block_hash in self.slots:
            self.slots.move_to_end(block_hash)
            return
        if not self.free_slots:
            old_hash, old_slot = self.slots.popitem(last=False)
            self.evictions += 1
            if self.next_tier is not None:
                self.next_tier.put(old_hash, self.slab[old_slot])
            self.free_slots.append(old_slot)
        slot = self.free_slots.pop()
        self.slab[slot].copy_(data)
        self.slots[block_hash] = slot
        self.stores += 1

    def close(self) -> None:
        self.slots.clear()
        self.slab = torch.empty(0, dtype=torch.uint8)


class TieredBlockStore:
    """The tiers as one store, fastest first: ``put`` goes to the first (which spills into the next),
    ``get`` takes the block from the first tier that holds a good copy."""

    def __init__(self, tiers: list[BlockStore]):
        if not tiers:
            raise ValueError("a tiered block store needs at least one tier")
        self.tiers = tiers
        self.bytes_per_block = tiers[0].bytes_per_block

    def contains(self, block_hash: bytes) -> bool:
        return any(tier.contains(block_hash) for tier in self.tiers)

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        for tier in self.tiers:
            if tier.contains(block_hash):
                data = tier.get(block_hash)
                if data is not None:
                    return data
        return None

    def put(self, block_hash: bytes, data: torch.Tensor) -> None:
        self.tiers[0].put(block_hash, data)

    def stats(self) -> tuple[KVTierStats, ...]:
        return tuple(tier.stats() for tier in self.tiers)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()


def build_block_store(memory: int | None, folder: str | None, disk_space: int, bytes_per_block: int,
                      device: torch.device) -> TieredBlockStore | None:
    """The configured tiers (``CacheConfig.kv_offload_*``) for blocks of ``bytes_per_block``; None if none."""
    disk = DiskBlockStore(folder, disk_space, bytes_per_block) if folder is not None else None
    tiers: list[BlockStore] = []
    if memory is not None:
        tiers.append(HostBlockStore(memory, bytes_per_block, pin=device.type == "cuda", next_tier=disk))
    if disk is not None:
        tiers.append(disk)
    if not tiers:
        return None
    store = TieredBlockStore(tiers)
    logger.info("KV offload tiers: %s", "; ".join(stats.describe() for stats in store.stats()))
    return store
