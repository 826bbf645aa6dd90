"""Rotary position embedding in the "rotate half" layout of Hugging Face Llama.

llama2.c checkpoints rotate interleaved pairs instead; their loader permutes the rows of wq and
wk once so that this one layout serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.config import RopeScaling
from tokenmill.kernels import cpu_kernels
from tokenmill.kernels.triton_ops import triton_ops


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim/2,) float64 inverse frequencies, stretched as ``scaling`` says."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths scaled by `factor`, short ones kept, a smooth ramp between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class RopeInputs:
    """One step's rotary inputs, prepared once and shared by every layer."""

    positions: torch.Tensor
    """(T,) int64."""
    cos: torch.Tensor | None
    """(T, 1, head_dim) in the model's dtype; None when a fused kernel reads the tables itself."""
    signed_sin: torch.Tensor | None


class RotaryEmbedding(nn.Module):
    """Rotary embedding from precomputed (max_position, head_dim/2) cos/sin tables."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling).float()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_position, head_dim/2)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        if triton_ops(positions.device) is not None or (positions.device.type == "cpu" and cpu_kernels() is not None):
            return RopeInputs(positions, None, None)
        cos, sin = self.cos[positions], self.sin[positions]  # (T, head_dim/2)
        # Full-width tables: cos for both halves, sin signed [-sin | sin] so that
        # rotate_half(x) * sin == roll(x, d/2) * signed_sin (the reference casts them to x's dtype).
        full_cos = torch.cat([cos, cos], -1).unsqueeze(1).to(dtype)
        signed_sin = torch.cat([-sin, sin], -1).unsqueeze(1).to(dtype)
        return RopeInputs(positions, full_cos, signed_sin)

    def rotate_(self, rope: RopeInputs, rows: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Rotates, in place, the first ``num_heads`` heads of each row of ``rows`` (T, width), contiguous."""
        if rope.cos is None:
            ops = triton_ops(rows.device) or cpu_kernels()
            ops.rotary_inplace(rows, rope.positions, self.cos, self.sin, num_heads, head_dim)
            return
        heads = rows[:, :num_heads * head_dim].view(rows.shape[0], num_heads, head_dim)
        heads.copy_(apply_rotary(heads, rope.cos, rope.signed_sin))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, d) rotated by position: the pairs (i, i + d/2) turn by the angle of frequency i."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
