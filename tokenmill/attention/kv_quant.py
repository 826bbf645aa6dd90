"""Quantized KV caches.

- ``int8``: K and V stored as int8 with a float16 scale per token and KV head. Each new K (or V)
  row of one head is scaled by ``max|x| / 127`` and rounded; reading multiplies back. At head_dim
  64 a token's row takes 64 + 2 bytes instead of 128 (bf16/fp16): the same memory holds 1.94x the
  tokens (1.97x at head_dim 128).
- ``fp8_e4m3``: K and V stored as float8 e4m3 (1 byte) divided by one per-tensor scale (1.0, as
  vLLM uses without calibration; values beyond +-448 saturate): exactly 2x the tokens.

Attention always reads the round-tripped values, for the tokens of the current chunk too, so that
chunking, prefix hits and preemption see the same numbers as one long prefill.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, nkv, d) -> (codes (T, nkv, d) int8, scales (T, nkv) float16)."""
    # The stored (rounded) scale; at least float16's smallest normal, so that an all-zero row stays finite.
    scale = (x.abs().amax(-1).float() / 127).clamp(min=2**-14).half()
    codes = torch.round(x.float() / scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., nkv, d) int8, scales (..., nkv) -> (..., nkv, d) in ``dtype``."""
    return (codes.float() * scales.float().unsqueeze(-1)).to(dtype)


def _gather_rows(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache (num_blocks, block_size, ...) -> (B, W * block_size, ...) for block_tables (B, W)."""
    batch, width = block_tables.shape
    rows = cache.view(cache.shape[0], -1).index_select(0, block_tables.flatten())
    return rows.view(batch, width * cache.shape[1], *cache.shape[2:])


@dataclass
class QuantizedCacheSide:
    """K or V of one layer of a quantized cache; ``gather`` returns dequantized values in ``dtype``."""

    codes: torch.Tensor
    """(num_blocks, block_size, nkv, d)."""
    dtype: torch.dtype
    """The model's compute dtype, which reads return."""

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


@dataclass
class Int8CacheSide(QuantizedCacheSide):
    scales: torch.Tensor
    """(num_blocks, block_size, nkv) float16."""

    def gather(self, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables (B, W) -> (B, W * block_size, nkv, d) dequantized."""
        return dequantize_rows(_gather_rows(self.codes, block_tables), _gather_rows(self.scales, block_tables),
                               self.dtype)


@dataclass
class Fp8CacheSide(QuantizedCacheSide):
    scale: float

    def gather(self, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables (B, W) -> (B, W * block_size, nkv, d) dequantized."""
        values = _gather_rows(self.codes, block_tables).view(torch.float8_e4m3fn).float() * self.scale
        return values.to(self.dtype)


def to_fp8_bytes(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8 e4m3 (saturating at +-448), viewed as uint8."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


class QuantizedKVCache(ABC):
    """One layer's quantized cache: codes (2, num_blocks, block_size, nkv, d), K at index 0 and V at 1."""

    codes: torch.Tensor
    dtype: torch.dtype

    @abstractmethod
    def _encode(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(codes, per-row scales or None) of new rows x (T, nkv, d)."""

    @abstractmethod
    def _decode(self, index: int, codes: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The values that ``codes`` (and ``scales``) stand for, in ``dtype``."""

    def _write_fused(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Writes with one kernel where there is one (returns False to take the PyTorch path)."""
        return False

    @abstractmethod
    def side(self, index: int) -> QuantizedCacheSide:
        """K (0) or V (1), for reading."""

    @abstractmethod
    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: blocks dst take blocks src's contents."""

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              round_trip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (T, nkv, d) at their slots; returns them as reads will see them (round-tripped),
        or as given when ``round_trip`` is off (a decode-only step reads them from the cache)."""
        if not round_trip and self._write_fused(slot_mapping, k, v):
            return k, v
        _, num_blocks, block_size, num_kv_heads, head_dim = self.codes.shape
        out = []
        for index, x in enumerate((k, v)):
            codes, scales = self._encode(index, x)
            self.codes[index].view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, codes)
            if scales is not None:
                self.scales[index].view(num_blocks * block_size, num_kv_heads).index_copy_(0, slot_mapping, scales)
            out.append(self._decode(index, codes, scales, x.dtype) if round_trip else x)
        return out[0], out[1]


class Int8KVCache(QuantizedKVCache):
    """Codes (2, num_blocks, block_size, nkv, d) int8 and scales (2, ..., nkv) float16."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.codes = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.int8, device=device)
        self.scales = torch.zeros(2, num_blocks, block_size, num_kv_heads, dtype=torch.float16, device=device)
        self.dtype = dtype

    def side(self, index: int) -> Int8CacheSide:
        return Int8CacheSide(self.codes[index], self.dtype, self.scales[index])

    def _encode(self, index, x):
        return quantize_rows(x)

    def _write_fused(self, slot_mapping, k, v):
        from tokenmill.kernels import cpu_kernels

        kernels = cpu_kernels() if self.codes.device.type == "cpu" else None
        if kernels is None:
            return False
        kernels.write_kv_int8(k, v, self.codes[0], self.codes[1], self.scales[0], self.scales[1], slot_mapping)
        return True

    def _decode(self, index, codes, scales, dtype):
        return dequantize_rows(codes, scales, dtype)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: block dst takes block src's codes and scales."""
        self.codes[:, dst] = self.codes[:, src]
        self.scales[:, dst] = self.scales[:, src]


class Fp8KVCache(QuantizedKVCache):
    """Float8 e4m3 bytes (2, num_blocks, block_size, nkv, d), kept as uint8 (CPU kernels cannot index
    float8 tensors) and viewed as float8 to read, and one scale for K and one for V."""

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, k_scale: float = 1.0, v_scale: float = 1.0):
        self.codes = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.uint8, device=device)
        self.scales = (k_scale, v_scale)
        self.dtype = dtype

    def side(self, index: int) -> Fp8CacheSide:
        return Fp8CacheSide(self.codes[index], self.dtype, self.scales[index])

    def _encode(self, index, x):
        return to_fp8_bytes(x, self.scales[index]), None

    def _decode(self, index, codes, scales, dtype):
        return (codes.view(torch.float8_e4m3fn).float() * self.scales[index]).to(dtype)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.codes[:, dst] = self.codes[:, src]




def make_kv_cache(kv_cache_dtype: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """One layer's cache of the backend's ``shape`` (2, num_blocks, block_size, nkv, d): a float
    tensor in ``dtype``, or a quantized cache whose reads return ``dtype``."""
    if kv_cache_dtype == "int8":
        return Int8KVCache(*shape[1:], dtype, device)
    if kv_cache_dtype == "fp8_e4m3":
        return Fp8KVCache(*shape[1:], dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device)


def bytes_per_element_row(head_dim: int, kv_cache_dtype: str, dtype_bytes: int) -> int:
    """Bytes of one token's K (or V) row of one head."""
    if kv_cache_dtype == "int8":
        return head_dim + 2
    return head_dim if kv_cache_dtype == "fp8_e4m3" else head_dim * dtype_bytes
