"""RMSNorm (Llama family) and LayerNorm (GPT-2), computed in float32 like the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_kernels
from tokenmill.kernels.triton_ops import triton_ops
from tokenmill.layers.linear import new_parameter


class RMSNorm(nn.Module):
    """RMSNorm whose output is in the model's dtype whatever the input's.

    Half-precision models keep their residual stream in float32 (more accurate, and it spares a
    slow half->float conversion before every norm): the norm then runs in float32 with a float32
    copy of its weight, and its output is rounded once for the next matrix product.
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(size)
        self.out_dtype = self.weight.dtype

    def process_weights_after_loading(self) -> None:
        self.out_dtype = self.weight.dtype
        self.weight.data = self.weight.data.float()

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """(..., size) -> same shape in out_dtype. With ``add``, ``x`` (the float32 residual stream)
        is first updated in place, ``x += add``, in the same pass (a fused kernel: Triton on CUDA, C++ on CPU)."""
        fusable = x.dtype == torch.float32 and x.is_contiguous()
        ops = triton_ops(x.device)
        if ops is not None and fusable and x.dim() == 2 and (add is None or add.is_contiguous()):
            return ops.add_rms_norm(x, add, self.weight, self.eps, self.out_dtype)
        kernels = cpu_kernels() if x.device.type == "cpu" else None
        if kernels is not None and fusable:
            return kernels.add_rms_norm(x, add, self.weight.float(), self.eps, self.out_dtype)
        if add is not None:
            x.add_(add)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(self.out_dtype)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(size)
        self.bias = new_parameter(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., size) -> same
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
