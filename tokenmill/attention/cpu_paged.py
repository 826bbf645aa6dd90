"""CPU backend: a C++ decode kernel that reads K/V in place through the block tables.

The portable backend gathers each request's blocks into a padded copy before attending; at
long contexts that copy costs more than the attention itself. This backend keeps prompt chunks
on the portable path (fused flash SDPA) and sends decodes to ``kernels/csrc/paged_decode.cpp``,
which also reads the int8 KV cache (codes and per-token scales) and the fp8 one in place.
"""

from __future__ import annotations

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.kv_quant import Fp8CacheSide, Int8CacheSide
from tokenmill.attention.torch_paged import TorchPagedAttention
from tokenmill.kernels import cpu_kernels


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def __init__(self):
        kernels = cpu_kernels()
        if kernels is None:
            raise RuntimeError("the CPU paged-attention kernel could not be built (see the warning above)")
        self.kernels = kernels

    def _write(self, k, v, key_cache, value_cache, slot_mapping: torch.Tensor) -> None:
        """The row copy the C++ decode step makes (same bytes as index_copy_, without its dispatch)."""
        self.kernels.write_kv(k, v, key_cache, value_cache, slot_mapping)

    def _decode(self, q, key_cache, value_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
        if isinstance(key_cache, Int8CacheSide):  # codes and their per-token scales, read in place
            return self.kernels.paged_decode_attention_int8(q, key_cache.codes, value_cache.codes, key_cache.scales,
                                                            value_cache.scales, md.decode_block_tables,
                                                            md.decode_seq_lens, scale)
        if isinstance(key_cache, Fp8CacheSide):
            return self.kernels.paged_decode_attention_fp8(q, key_cache.codes, value_cache.codes, key_cache.scale,
                                                           value_cache.scale, md.decode_block_tables,
                                                           md.decode_seq_lens, scale)
        return self.kernels.paged_decode_attention(q, key_cache, value_cache, md.decode_block_tables,
                                                   md.decode_seq_lens, scale)
