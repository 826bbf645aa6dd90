"""Portable paged attention in plain PyTorch (CPU and CUDA): the reference backend.

Decodes are batched: each request's blocks are gathered through its block table into a padded
(num_decodes, max_len) context and one scaled-dot-product call attends over all of them, with
the query heads of a KV group folded into the query axis so that K/V are never repeated.
Prompt chunks are attended one request at a time (a step holds few of them), causally, over the
cached context plus the chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata, PrefillSpan
from tokenmill.attention.kv_quant import QuantizedCacheSide, QuantizedKVCache


class TorchPagedAttention(AttentionBackend):
    name = "torch"

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if isinstance(kv_cache, QuantizedKVCache):  # reads dequantize the gathered blocks (side.gather)
            k, v = kv_cache.write(metadata.slot_mapping, k, v, round_trip=bool(metadata.prefills))
            key_cache, value_cache = kv_cache.side(0), kv_cache.side(1)
        else:
            key_cache, value_cache = kv_cache[0], kv_cache[1]  # (num_blocks, block_size, nkv, d) each
            self._write(k, v, key_cache, value_cache, metadata.slot_mapping)

        n = metadata.num_decodes
        if not metadata.prefills:  # pure decode step: no output buffer to fill
            return self._decode(q, key_cache, value_cache, metadata, scale)
        out = torch.empty_like(q)  # (T, nh, d)
        if n:
            out[:n] = self._decode(q[:n], key_cache, value_cache, metadata, scale)
        for span in metadata.prefills:
            out[span.query_start:span.query_end] = self._prefill(
                q[span.query_start:span.query_end], k[span.query_start:span.query_end],
                v[span.query_start:span.query_end], key_cache, value_cache, span, scale)
        return out

    @staticmethod
    def _write(k, v, key_cache, value_cache, slot_mapping: torch.Tensor) -> None:
        """New K/V rows (T, nkv, d) into a float cache (num_blocks, block_size, nkv, d) at slot_mapping (T,)."""
        num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
        key_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        value_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)

    def _decode(self, q, key_cache, value_cache, md: AttentionMetadata, scale: float) -> torch.Tensor:
        num_decodes, num_heads, head_dim = q.shape
        num_kv_heads = key_cache.shape[2]
        group = num_heads // num_kv_heads
        max_len = md.max_decode_seq_len
        keys = _gather_blocks(key_cache, md.decode_block_tables)[:, :max_len].transpose(1, 2)  # (D, nkv, L, d)
        values = _gather_blocks(value_cache, md.decode_block_tables)[:, :max_len].transpose(1, 2)
        query = q.view(num_decodes, num_kv_heads, group, head_dim)  # heads of one KV group share keys
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=md.decode_mask, scale=scale)
        return out.reshape(num_decodes, num_heads, head_dim)

    @staticmethod
    def _prefill(q, k, v, key_cache, value_cache, span: PrefillSpan, scale: float) -> torch.Tensor:
        # Inputs are 4-D (1, heads, n, d): only then does CPU SDPA take its fused flash kernel.
        gqa = q.shape[1] != key_cache.shape[2]
        query = q.transpose(0, 1)[None]  # (1, nh, n, d)
        if span.num_computed_tokens == 0:  # the chunk is the whole context
            keys, values = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, nkv, n, d)
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
            return out[0].transpose(0, 1)
        seq_len = span.seq_len
        keys = _gather_blocks(key_cache, span.block_table[None])[:, :seq_len].transpose(1, 2)  # (1, nkv, seq_len, d)
        values = _gather_blocks(value_cache, span.block_table[None])[:, :seq_len].transpose(1, 2)
        # New token i sits at position num_computed + i and sees keys 0..num_computed + i.
        query_pos = torch.arange(span.num_computed_tokens, seq_len, device=q.device)
        key_pos = torch.arange(seq_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # (n, seq_len)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)


def _gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, nkv, d), block_tables (B, W) -> (B, W * block_size, nkv, d).

    index_select over whole blocks viewed as rows is a plain row copy, several times faster than
    advanced indexing of the 4-D cache. A quantized cache side gathers and dequantizes its own.
    """
    if isinstance(cache, QuantizedCacheSide):
        return cache.gather(block_tables)
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    batch, width = block_tables.shape
    rows = cache.view(num_blocks, -1).index_select(0, block_tables.flatten())
    return rows.view(batch, width * block_size, num_kv_heads, head_dim)
