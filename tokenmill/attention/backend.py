"""The attention backend interface and the per-step metadata that every backend reads.

A step's tokens are packed without padding: decode requests (one new token each) first, then
requests that prefill a prompt chunk. Worked example, block_size 4, two requests:

- request A decodes its 7th token (6 already cached, in blocks [3, 8]);
- request B prefills prompt tokens 0..2 into a fresh block [5].

    positions      = [6, 0, 1, 2]
    slot_mapping   = [8*4+2, 5*4+0, 5*4+1, 5*4+2] = [34, 20, 21, 22]
    decode_block_tables = [[3, 8]],  decode_seq_lens = [7]
    prefills       = [PrefillSpan(query_start=1, query_end=4, num_computed_tokens=0, block_table=[5])]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PrefillSpan:
    """One request's prompt chunk inside the packed batch (host-side integers, no device sync)."""

    query_start: int
    """Index of its first new token in the packed batch."""
    query_end: int
    num_computed_tokens: int
    """Tokens of this request already in the KV cache before this step."""
    block_table: torch.Tensor
    """(num_blocks_of_request,) int64 block ids on the device, covering all its tokens after this step."""

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + self.query_end - self.query_start


@dataclass(frozen=True)
class PrefillBatch:
    """All of a step's prompt chunks as device tensors, for kernels that take them in one launch.

    With the worked example above: query_start_loc = [1, 4], num_computed_tokens = [0],
    block_tables = [[5]], max_query_len = 3.
    """

    query_start_loc: torch.Tensor
    """(P + 1,) int32: chunk i's new tokens are rows query_start_loc[i]:query_start_loc[i + 1] of the batch."""
    num_computed_tokens: torch.Tensor
    """(P,) int32: tokens of chunk i's request already in the cache."""
    block_tables: torch.Tensor
    """(P, W) int64 block ids, padded with 0 past each request's blocks."""
    max_query_len: int


@dataclass(frozen=True)
class AttentionMetadata:
    """What attention needs to know about one step's batch; built by the model runner."""

    slot_mapping: torch.Tensor
    """(num_tokens,) int64: cache slot (block_id * block_size + offset) each new token's K/V goes to."""
    num_decodes: int
    """The first ``num_decodes`` tokens are single-token decodes of distinct requests."""
    decode_block_tables: torch.Tensor | None
    """(num_decodes, max_num_blocks) int64 block ids, padded with 0 past each request's blocks."""
    decode_seq_lens: torch.Tensor | None
    """(num_decodes,) int64 context length including the new token."""
    max_decode_seq_len: int
    decode_mask: torch.Tensor | None
    """(num_decodes, 1, 1, max_decode_seq_len) bool: True where a key position is inside the context;
    None when every decode has the same context length."""
    prefills: tuple[PrefillSpan, ...] = field(default_factory=tuple)
    prefill_batch: PrefillBatch | None = None
    """The same prompt chunks, packed (None when there are none)."""


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and computes attention for a packed batch."""

    name: str

    @staticmethod
    @abstractmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's cache tensor."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        """q (T, nh, d), k and v (T, nkv, d) -> (T, nh, d); writes k, v into ``kv_cache`` first."""
