"""QuantizedMatrix: a weight matrix held as 8- or 4-bit codes, and its matrix product.

Every quantized linear method (int8, int4, GPTQ) ends here after loading, so that one kernel
serves them all: ``W[n, k] = scale[n, g] * (code[n, k] - zero[n, g])`` with ``g = k // group_size``
(after an optional permutation of the inputs, which act-order GPTQ checkpoints need so that each
group's inputs are contiguous). CUDA: the Triton kernel in ``kernels/triton_quant_linear.py``.
CPU: the C++ kernel in ``kernels/csrc/quant_linear.cpp``. Without either: dequantize and
``F.linear`` (correct, not fast).

8- and 4-bit codes of a bf16/fp16 model (``int8_activations``) are held in the panel layout
where the CPU kernels can multiply it (AVX2 or AVX-512): activations are then rounded to int8 per block of 64
inputs, as llama.cpp rounds them for its q8_0 dot products, and every batch size runs on integer dot
products. Panels hold each scale in float16 (in units of a power of two per matrix, so no scale
leaves float16's normal range) and each zero point in a byte, as llama.cpp holds its block scales:
3 bytes per group and output instead of 8. Float32 models keep the row layout, float32 scales and
the exact float path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_kernels
from tokenmill.kernels.triton_ops import triton_ops
from tokenmill.layers.quantization.packing import (pack_nibbles, pack_panels, unpack_nibbles,
                                                    unpack_panels)


class QuantizedMatrix(nn.Module):
    """Codes, scales and zeros of one (N, K) weight, as buffers (they move with ``.to``)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 perm: torch.Tensor | None = None, int8_activations: bool = False):
        """codes (N, K) unsigned in [0, 2**bits); scales and zeros (N, G) with G = ceil(K / group_size),
        group_size -1 meaning K; perm (K,): input ``perm[i]`` of the checkpoint is input ``i`` here.
        ``int8_activations``: the model's activations are bf16/fp16, so the codes may take the panel
        layout (on CPUs whose kernels support it, for shapes it holds)."""
        super().__init__()
        out_features, in_features = codes.shape
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.group_size = in_features if group_size == -1 else group_size
        num_groups = -(-in_features // self.group_size)
        if scales.shape != (out_features, num_groups) or zeros.shape != scales.shape:
            raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must be "
                             f"({out_features}, {num_groups})")
        center = 2 ** (bits - 1)  # codes and zeros are stored centred on 0 (see the kernel's header)
        # The 4-bit layout packs 32 inputs per 16 bytes; other shapes keep 4-bit codes one per byte.
        self.storage_bits = 4 if bits == 4 and in_features % 32 == 0 and self.group_size % 32 == 0 else 8
        self.panels = int8_activations and _panels_fit(codes, zeros, self.group_size)
        self.scale_unit = 1.0
        """Panels: the power of two that every stored float16 scale is a multiple of."""
        if self.panels:  # (N / 16, K / 4 or 8, 16, 4) uint8; scales and zeros (N / 16, G, 16): 16 outputs' in one load
            stored = pack_panels(codes, self.storage_bits)
            self.scale_unit = _scale_unit(scales)
            scales = _panel_order((scales.float() / self.scale_unit).half())  # float16 (N / 16, G, 16)
            zeros = _panel_order(zeros.to(torch.uint8))  # uint8 (N / 16, G, 16), uncentred
            scaled_zeros = None
        else:
            stored = (pack_nibbles(codes) if self.storage_bits == 4  # (N, K / 2) uint8
                      else (codes.to(torch.int32) - center).to(torch.int8).contiguous())  # (N, K) int8
            scaled_zeros = (scales.float() * (zeros.float() - center)).contiguous()  # float32 (N, G)
            scales, zeros = scales.float().contiguous(), None
        self.register_buffer("codes", stored)
        self.register_buffer("scales", scales)  # rows: float32 (N, G); panels: float16 (N / 16, G, 16)
        self.register_buffer("zeros", zeros)  # panels: uint8 zero points (N / 16, G, 16); rows: None
        self.register_buffer("scaled_zeros", scaled_zeros)  # rows: float32 scale * (zero - centre) (N, G); panels: None
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if triton_ops(x.device) is not None and not self.panels:  # CUDA (or CPU under the Triton interpreter, for tests)
            from tokenmill.kernels.triton_quant_linear import quant_linear

            return quant_linear(x, self.codes, self.scales, self.scaled_zeros, self.group_size, self.storage_bits,
                                bias)
        kernels = cpu_kernels() if x.device.type == "cpu" else None
        if kernels is not None:
            return kernels.quant_linear(x.contiguous(), self.codes, self.scales, self.kernel_zeros, self.group_size,
                                        self.storage_bits, self.scale_unit, bias)
        return F.linear(x, self._dequantize_stored().to(x.dtype), bias)

    @property
    def kernel_zeros(self) -> torch.Tensor:
        """What the C++ kernel takes beside the scales: panels' uint8 zero points, rows' scaled zeros."""
        return self.zeros if self.panels else self.scaled_zeros

    def _dequantize_stored(self) -> torch.Tensor:
        """(N, K) float32 in the stored (permuted) input order."""
        size, in_features = self.group_size, self.in_features
        expand = lambda t: t.repeat_interleave(size, dim=1)[:, :in_features]  # noqa: E731  (N, G) -> (N, K)
        if self.panels:  # scale * (code - zero), everything stored (N / 16, G, 16)
            codes = unpack_panels(self.codes, self.storage_bits).float()
            scales = _row_order(self.scales).float() * self.scale_unit
            return expand(scales) * (codes - expand(_row_order(self.zeros).float()))
        centred = unpack_nibbles(self.codes).float() - 8 if self.storage_bits == 4 else self.codes.float()
        return expand(self.scales) * centred - expand(self.scaled_zeros)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) weight these codes stand for, inputs in the checkpoint's order."""
        weight = self._dequantize_stored()
        if self.perm is None:
            return weight
        restored = torch.empty_like(weight)
        restored[:, self.perm] = weight
        return restored

    def nbytes(self) -> int:
        """Bytes one matrix product reads: codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.kernel_zeros))

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, {self.bits}-bit, group {self.group_size}"
                f"{', act-order' if self.perm is not None else ''}{', panels' if self.panels else ''}")


def _panel_order(per_group: torch.Tensor) -> torch.Tensor:
    """(N, G) -> (N / 16, G, 16): each panel's 16 outputs side by side, its groups one after another."""
    out_features, num_groups = per_group.shape
    return per_group.view(out_features // 16, 16, num_groups).transpose(1, 2).contiguous()


def _row_order(panelled: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_panel_order`."""
    count, num_groups, lanes = panelled.shape
    return panelled.transpose(1, 2).reshape(count * lanes, num_groups)


def _scale_unit(scales: torch.Tensor) -> float:
    """A power of two that brings the largest scale to [2**13, 2**14): float16 then holds every
    scale down to 2**-28 of the largest in its normal range (11 significant bits)."""
    largest = scales.abs().max().item() if scales.numel() else 0.0
    return 1.0 if largest == 0 or not math.isfinite(largest) else 2.0 ** (math.floor(math.log2(largest)) - 13)


def _panels_fit(codes: torch.Tensor, zeros: torch.Tensor, group_size: int) -> bool:
    """Whether (N, K) codes on this device can take the panel layout: CPU kernels with
    AVX2 or AVX-512 (and no Triton interpreter, which runs the row layout), N a multiple of 16, K of 64,
    groups of 32 or a multiple of 64 inputs, zero points whole numbers a byte holds (as RTN and GPTQ make them)."""
    out_features, in_features = codes.shape
    group = min(group_size, in_features)
    if codes.device.type != "cpu" or out_features % 16 or in_features % 64 or (group != 32 and group % 64):
        return False
    if zeros.numel() and not (torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 255):
        return False
    if triton_ops(codes.device) is not None:
        return False
    kernels = cpu_kernels()
    return kernels is not None and kernels.quant_panels_available()
