"""Bit packing of quantized weights: the GPTQ checkpoint format and tokenmill's 4-bit kernel layout.

GPTQ (AutoGPTQ, GPTQModel, transformers) packs 32 // bits codes into each int32, lowest bits first:
- ``qweight`` (K * bits / 32, N): packed along the input dimension; code of input ``k`` of output
  ``n`` sits in ``qweight[k // pack, n]`` at bits ``(k % pack) * bits``;
- ``qzeros`` (num_groups, N * bits / 32): packed along the output dimension the same way.

tokenmill's 4-bit layout (what ``kernels/csrc/quant_linear.cpp`` reads): (N, K / 2) uint8 in
chunks of 32 inputs; byte ``16 c + j`` of a row holds input ``32 c + j`` in its low nibble and
input ``32 c + 16 + j`` in its high nibble.

tokenmill's quantized panel layout (``kernels/csrc/quant_panels.cpp``): 8-bit (N / 16, K / 4, 16, 4)
uint8, the unsigned code of output ``16 p + j``, input ``4 k4 + i`` at ``[p, k4, j, i]``: 16 outputs x 4
inputs per 64 bytes, what one AVX512-VNNI instruction (or two AVX2 vpmaddubsw/vpmaddwd pairs) multiplies;
4-bit (N / 16, K / 8, 16, 4), two such groups of 4 inputs per byte (low nibble, high nibble).

Float weights' panel layout (``kernels/csrc/dense_panels.cpp``): float32 (N / 16, K, 16) and bf16
(N / 16, K / 2, 16, 2), W[16 p + j, k] at [p, k, j] (bf16: [p, k // 2, j, k % 2]).
"""

from __future__ import annotations

import torch


def _pack_factor(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 to pack into int32, got {bits}")
    return 32 // bits


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes (values in [0, 2**bits)) -> int32, ``32 // bits`` codes per int32 along ``dim``."""
    pack = _pack_factor(bits)
    if codes.shape[dim] % pack:
        raise ValueError(f"dimension {dim} of size {codes.shape[dim]} is not a multiple of {pack} ({bits}-bit packing)")
    moved = codes.movedim(dim, -1).to(torch.int64)
    grouped = moved.reshape(*moved.shape[:-1], -1, pack)  # (..., size / pack, pack)
    shifts = torch.arange(pack, dtype=torch.int64, device=codes.device) * bits
    words = (grouped << shifts).sum(-1)  # < 2**32, as int64
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    return words.movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes (int32), the inverse of :func:`pack_int32`."""
    pack = _pack_factor(bits)
    moved = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pack, dtype=torch.int64, device=packed.device) * bits
    codes = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., words, pack)
    return codes.reshape(*moved.shape[:-1], -1).to(torch.int32).movedim(-1, dim).contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 16) -> (N, K / 2) uint8 in the kernel's chunk-of-32 layout (K % 32 == 0)."""
    rows, in_features = codes.shape
    if in_features % 32:
        raise ValueError(f"4-bit kernel layout needs in_features divisible by 32, got {in_features}")
    chunks = codes.to(torch.uint8).view(rows, in_features // 32, 2, 16)  # [.., 0, :] low halves, [.., 1, :] high
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(rows, in_features // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) uint8 codes in [0, 16), the inverse of :func:`pack_nibbles`."""
    rows, half = packed.shape
    chunks = packed.view(rows, half // 16, 1, 16)
    both = torch.cat([chunks & 0xF, chunks >> 4], dim=2)  # (N, K / 32, 2, 16)
    return both.reshape(rows, half * 2).contiguous()


def pack_panels(codes: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """(N, K) unsigned codes (0..2**bits - 1) -> (N / 16, K / 4, 16, 4) uint8 8-bit panels of the codes,
    or (N / 16, K / 8, 16, 4) 4-bit panels: byte [p, k8, j, i] holds input 8 k8 + i in its low nibble and
    8 k8 + 4 + i in its high one."""
    rows, in_features = codes.shape
    step = 4 if bits == 8 else 8
    if rows % 16 or in_features % step:
        raise ValueError(f"{bits}-bit panels need outputs divisible by 16 and inputs by {step}, "
                         f"got ({rows}, {in_features})")
    unsigned = codes.to(torch.uint8)
    if bits == 4:
        quads = unsigned.view(rows, in_features // 8, 2, 4)
        unsigned = (quads[:, :, 0] | (quads[:, :, 1] << 4)).reshape(rows, in_features // 2)
    return unsigned.view(rows // 16, 16, -1, 4).permute(0, 2, 1, 3).contiguous()


def unpack_panels(panels: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The (N, K) unsigned codes (int16) back from :func:`pack_panels`."""
    blocks, steps = panels.shape[:2]
    rows = panels.permute(0, 2, 1, 3).reshape(blocks * 16, steps * 4).to(torch.int16)
    if bits == 8:
        return rows
    quads = rows.view(blocks * 16, steps, 1, 4)
    return torch.cat([quads & 0xF, quads >> 4], dim=2).reshape(blocks * 16, steps * 8)


def pack_dense_panels(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 -> (N / 16, K, 16); bf16 -> (N / 16, K / 2, 16, 2). N % 16 == 0 (bf16: K even)."""
    rows, in_features = weight.shape
    pair = 2 if weight.dtype == torch.bfloat16 else 1
    if rows % 16 or in_features % pair:
        raise ValueError(f"{weight.dtype} panels need outputs divisible by 16 and inputs by {pair}, "
                         f"got ({rows}, {in_features})")
    blocks = weight.reshape(rows // 16, 16, in_features // pair, pair).permute(0, 2, 1, 3).contiguous()
    return blocks if pair == 2 else blocks.squeeze(-1)


def unpack_dense_panels(panels: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight back from :func:`pack_dense_panels`."""
    blocks = panels if panels.dim() == 4 else panels.unsqueeze(-1)  # (N / 16, K / pair, 16, pair)
    count, steps, lanes, pair = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(count * lanes, steps * pair)
