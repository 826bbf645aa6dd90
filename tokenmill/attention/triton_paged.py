"""Triton backend (the default on CUDA): every step's attention in at most four launches per layer.

- the KV write: each new token's K/V row to its slot (``slot_mapping``; slots < 0 are skipped);
- decodes: flash-decoding over the paged cache, read in place through the block tables. A
  request's context is cut into splits attended in parallel (so that batch 1 fills the GPU),
  then combined by their log-sum-exp; the query heads of a KV group are packed into one tile, so
  each K/V tile is loaded once per group;
- prompt chunks: one launch for all of them (variable lengths), each new token attending
  causally to its cached context (prefix-cache hits, earlier chunks) and to the chunk itself.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI
checks them against the portable backend.
"""

from __future__ import annotations

import os

import torch

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.attention.kv_quant import Fp8KVCache, Int8KVCache, to_fp8_bytes
from tokenmill.attention.torch_paged import TorchPagedAttention


def triton_available(device: torch.device) -> str | None:
    """None if this backend can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels need CUDA; on {device} they run only under its interpreter "
            "(set TRITON_INTERPRET=1 before starting, for testing)")


def _num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough KV splits for about two programs per streaming multiprocessor, each split at least
    256 tokens long (shorter ones cost more in the combine than they save)."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-target // max(1, num_decodes * num_kv_heads))
    return max(1, min(wanted, -(-max_seq_len // 256)))


class TritonPagedAttention(AttentionBackend):
    name = "triton"

    def __init__(self):
        from tokenmill.attention.kernels import paged_attention

        self.kernels = paged_attention

    kv_cache_shape = staticmethod(TorchPagedAttention.kv_cache_shape)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if isinstance(kv_cache, Int8KVCache):  # quantized as written; the attention kernels dequantize as they read
            self.kernels.write_kv_int8(k, v, kv_cache, metadata.slot_mapping)
            num_kv_heads = kv_cache.codes.shape[3]
        elif isinstance(kv_cache, Fp8KVCache):  # cast to float8 bytes, then the same row copy (slots < 0 skipped)
            k_scale, v_scale = kv_cache.scales
            self.kernels.write_kv(to_fp8_bytes(k, k_scale), to_fp8_bytes(v, v_scale), kv_cache.codes,
                                  metadata.slot_mapping)
            num_kv_heads = kv_cache.codes.shape[3]
        else:
            self.kernels.write_kv(k, v, kv_cache, metadata.slot_mapping)
            num_kv_heads = kv_cache.shape[3]
        out = torch.empty_like(q)  # (T, nh, d)
        n = metadata.num_decodes
        if n:
            splits = _num_splits(n, num_kv_heads, metadata.max_decode_seq_len, q.device)
            self.kernels.paged_decode(q[:n], kv_cache, metadata.decode_block_tables, metadata.decode_seq_lens,
                                      metadata.max_decode_seq_len, scale, splits, out=out[:n])
        if metadata.prefills:
            batch = metadata.prefill_batch
            self.kernels.paged_prefill(q, kv_cache, out, batch.block_tables, batch.query_start_loc,
                                       batch.num_computed_tokens, batch.max_query_len, scale)
        return out
