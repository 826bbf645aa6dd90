"""RMSNorm (Llama family) and LayerNorm (GPT-2), computed in float32 like the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.linear import new_parameter


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., size) -> same
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(size)
        self.bias = new_parameter(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., size) -> same
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
