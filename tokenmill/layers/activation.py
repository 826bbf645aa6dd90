"""Activations: the gated SwiGLU of the Llama family and GPT-2's tanh GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu_kernels
from tokenmill.kernels.triton_ops import triton_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2*I) holding [gate | up] -> (..., I) = silu(gate) * up (one fused pass: Triton on CUDA, C++ on CPU)."""
    ops = triton_ops(gate_up.device)
    if ops is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return ops.silu_and_mul(gate_up)
    kernels = cpu_kernels() if gate_up.device.type == "cpu" else None
    if kernels is not None:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``approximate="tanh"`` is GPT-2's ``gelu_new``; ``"none"`` the exact erf form."""
    return F.gelu(x, approximate=approximate)
