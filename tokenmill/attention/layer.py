"""The attention module that model code calls; it hides the backend and the per-step metadata.

The model runner binds each layer's cache tensor once (``bind_kv_cache``) and scopes each
step's metadata with ``forward_context``; model code only calls ``attn(q, k, v)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata

_step_metadata: AttentionMetadata | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Makes ``metadata`` visible to every Attention layer for the duration of one forward pass."""
    global _step_metadata
    previous, _step_metadata = _step_metadata, metadata
    try:
        yield
    finally:
        _step_metadata = previous


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend: AttentionBackend | None = None
        self.kv_cache: torch.Tensor | None = None

    def bind_kv_cache(self, backend: AttentionBackend, kv_cache: torch.Tensor) -> None:
        self.backend, self.kv_cache = backend, kv_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, nh, d), k and v (T, nkv, d) -> (T, nh*d)."""
        if _step_metadata is None or self.backend is None:
            raise RuntimeError("Attention called outside a forward_context or before bind_kv_cache")
        out = self.backend.forward(q, k, v, self.kv_cache, _step_metadata, self.scale)
        return out.flatten(1)
