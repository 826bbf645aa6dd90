"""Round-to-nearest quantization of a weight matrix: the grid that GPTQ also uses for each group.

Asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``;
symmetric: ``scale = 2 * max|w| / (2**bits - 1)``, ``zero = 2**(bits - 1)`` (GPTQ's convention:
codes stay unsigned, the zero sits mid-range). The weight is ``scale * (code - zero)``.
"""

from __future__ import annotations

import torch


def group_ranges(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> per-group (min, max), each (N, G); group_size -1 means one group per row."""
    rows, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")
    grouped = weight.float().view(rows, in_features // size, size)
    return grouped.amin(-1), grouped.amax(-1)


def grid_from_range(w_min: torch.Tensor, w_max: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the quantization grid covering [w_min, w_max] (tensors of any one shape).

    The range always includes 0, so that zero is representable and never clamps; a constant-zero
    range gets scale 1 instead of 0."""
    max_code = 2**bits - 1
    w_min, w_max = torch.clamp(w_min, max=0.0), torch.clamp(w_max, min=0.0)
    if sym:
        bound = torch.maximum(w_min.abs(), w_max)
        scale = 2 * bound / max_code
        zero = torch.full_like(scale, float((max_code + 1) // 2))
    else:
        scale = (w_max - w_min) / max_code
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if zero is None:
        zero = torch.round(-w_min / scale).clamp(0, max_code)
    return scale, zero


def quantize_to_grid(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``; scale and zero broadcast against weight."""
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int,
                 sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (codes (N, K) int32, scales (N, G) float32, zeros (N, G) float32)."""
    rows, in_features = weight.shape
    w_min, w_max = group_ranges(weight, group_size)
    scale, zero = grid_from_range(w_min, w_max, bits, sym)  # (N, G)
    size = in_features if group_size == -1 else group_size
    expand = lambda t: t.repeat_interleave(size, dim=1)  # noqa: E731  (N, G) -> (N, K)
    codes = quantize_to_grid(weight, expand(scale), expand(zero), bits)
    return codes.to(torch.int32), scale.float(), zero.float()
