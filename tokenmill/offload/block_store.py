"""The interface of a KV tier (``BlockStore``) and the counts every tier reports (``KVTierStats``).

A tier holds KV blocks as flat byte rows (bytes_per_block,) uint8 on the CPU, keyed by the block's
prefix hash, and evicts the least recently used block when full. ``kv_tiers.py`` has the memory tier
and the chain of tiers; ``disk_kv_tier.py`` the disk tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class KVTierStats:
    """One tier's contents and its counts since start (in blocks)."""

    name: str
    """``cpu`` or ``disk`` (the metrics' ``tier`` label)."""
    location: str
    """``pinned CPU memory``, ``CPU memory`` or the disk tier's folder."""
    num_blocks: int
    capacity_blocks: int
    bytes_per_block: int
    hits: int
    """Blocks loaded back from this tier."""
    stores: int
    """Blocks written into this tier."""
    evictions: int
    """Blocks pushed out to make room (to the next tier, if any)."""
    failures: int
    """Blocks found missing or corrupt when read (recomputed instead)."""

    def describe(self) -> str:
        size = self.capacity_blocks * self.bytes_per_block / 2**20
        return (f"{self.name} ({self.location}): {size:.1f} MiB = {self.capacity_blocks} blocks of "
                f"{self.bytes_per_block / 2**10:.0f} KiB")


def merge_tier_stats(per_engine: list[tuple[KVTierStats, ...]]) -> tuple[KVTierStats, ...]:
    """Several engines' tiers (data-parallel replicas) summed tier by tier, by name."""
    merged: dict[str, KVTierStats] = {}
    for tiers in per_engine:
        for tier in tiers:
            seen = merged.get(tier.name)
            merged[tier.name] = tier if seen is None else replace(
                seen, location="several", **{name: getattr(seen, name) + getattr(tier, name) for name in (
                    "num_blocks", "capacity_blocks", "hits", "stores", "evictions", "failures")})
    return tuple(merged.values())


class BlockStore(ABC):
    """A tier of KV blocks: byte rows (``bytes_per_block``,) uint8 on the CPU, by prefix hash, LRU."""

    name: str
    location: str
    bytes_per_block: int
    capacity_blocks: int

    def __init__(self) -> None:
        self.hits = self.stores = self.evictions = self.failures = 0

    @abstractmethod
    def contains(self, block_hash: bytes) -> bool:
        """Whether the tier holds the block (a later ``get`` may still find it corrupt)."""

    @abstractmethod
    def get(self, block_hash: bytes) -> torch.Tensor | None:
        """The block's bytes (bytes_per_block,) uint8, marked most recently used; None if the tier does not
        hold it or it failed its check (then it is dropped from the tier). Read it before the next ``put``:
        a memory tier returns a view of its slot, which a put may give to another block."""

    @abstractmethod
    def put(self, block_hash: bytes, data: torch.Tensor) -> None:
        """Keeps a copy of ``data`` (bytes_per_block,) uint8 (already held: only marked most recently used),
        evicting the least recently used block when full."""

    @abstractmethod
    def __len__(self) -> int:
        """Blocks held."""

    def close(self) -> None:
        """Releases the tier's memory or files."""

    def stats(self) -> KVTierStats:
        return KVTierStats(self.name, self.location, len(self), self.capacity_blocks, self.bytes_per_block, self.hits,
                           self.stores, self.evictions, self.failures)
