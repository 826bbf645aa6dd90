"""Rotary position embedding in the "rotate half" layout of Hugging Face Llama.

llama2.c checkpoints rotate interleaved pairs instead; their loader permutes the rows of wq and
wk once so that this one layout serves both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tokenmill.config import RopeScaling


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


class RotaryEmbedding(nn.Module):
    """Rotary embedding from a precomputed cos/sin table: look up once per step, apply in every layer."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling).float()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_position, head_dim/2)
        # (max_position, head_dim): cos repeated for both halves; sin signed [-sin | sin] so that
        # rotate_half(x) * sin == roll(x, d/2) * signed_sin.
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], -1), persistent=False)
        self.register_buffer("signed_sin", torch.cat([-freqs.sin(), freqs.sin()], -1), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, signed sin (T, 1, head_dim) in ``dtype`` (as the reference casts them)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, d) rotated by position: the pairs (i, i + d/2) turn by the angle of frequency i."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
