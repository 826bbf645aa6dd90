"""Attention backends by name: ``torch`` (portable, CPU and CUDA), ``cpu`` (C++ decode kernel) and
``triton`` (Triton kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import importlib

import torch

from tokenmill.attention.backend import AttentionBackend

_BACKENDS = {"torch": ("tokenmill.attention.torch_paged", "TorchPagedAttention"),
             "cpu": ("tokenmill.attention.cpu_paged", "CpuPagedAttention"),
             "triton": ("tokenmill.attention.triton_paged", "TritonPagedAttention")}


def supported_backends() -> list[str]:
    return ["auto", *_BACKENDS]


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA (when installed), the C++ kernel on CPU when it builds, else the portable
    backend. Every backend reads and writes every cache kind (float, int8, fp8)."""
    from tokenmill.attention.triton_paged import triton_available

    if name == "auto":
        if device.type == "cpu":
            from tokenmill.kernels import cpu_kernels

            if cpu_kernels() is not None:
                return create_backend("cpu", device)
        elif triton_available(device) is None:
            return create_backend("triton", device)
        return create_backend("torch", device)
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not supported; supported: {', '.join(supported_backends())}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU only, not on {device}")
    if name == "triton" and (why := triton_available(device)) is not None:
        raise ValueError(f"attention backend 'triton' cannot run here: {why}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()
