"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

Projections that read the same input are merged into one GEMM (q/k/v, gate/up): fewer, larger
matrix products are faster at every batch size. Each merged parameter carries a
``weight_loader(param, tensor, shard_id)`` that copies one checkpoint tensor into its rows, and
``shard_ids``, the shards a complete checkpoint must provide.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable = None) -> None:
    """Copies ``loaded`` into ``param`` (casting dtype); raises ModelLoadError on a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ModelLoadError(f"weight shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


def new_parameter(*shape: int) -> nn.Parameter:
    """An uninitialised, frozen parameter: weights always come from a checkpoint or an explicit init."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN-prepacked bf16 weights: on CPUs with bf16 support (AMX, AVX512-BF16) they run matrix
    products ~2x faster at batch 1 and several times faster at larger batches than plain F.linear."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Linear(nn.Module):
    """y = x W^T (+ b); W is (out_features, in_features) as in torch.nn.Linear and checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_parameter(out_features, in_features)
        self.bias = new_parameter(out_features) if bias else None
        self.packed_weight: torch.Tensor | None = None

    def process_weights_after_loading(self) -> None:
        """Converts the loaded weight to the fastest layout for this device (once, after loading).

        A prepacked weight replaces the plain one, so the memory is not doubled; the layer then
        cannot load a checkpoint again.
        """
        if self.weight is not None and _can_prepack(self.weight):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dimension.

    ``shards`` maps each checkpoint shard id to its number of output rows, in order; e.g.
    ``{"q": 4096, "k": 1024, "v": 1024}`` puts q in rows [0, 4096), k in [4096, 5120), v after.
    """

    def __init__(self, in_features: int, shards: dict[Hashable, int], bias: bool = False):
        super().__init__(in_features, sum(shards.values()), bias)
        self.offsets: dict[Hashable, tuple[int, int]] = {}
        start = 0
        for shard_id, rows in shards.items():
            self.offsets[shard_id] = (start, rows)
            start += rows
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard
                param.shard_ids = tuple(shards)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Hashable) -> None:
        if shard_id not in self.offsets:
            raise ModelLoadError(f"unknown shard {shard_id!r}; expected one of {list(self.offsets)}")
        start, rows = self.offsets[shard_id]
        default_weight_loader(param.data.narrow(0, start, rows), loaded)

    def output_sizes(self) -> Sequence[int]:
        return [rows for _, rows in self.offsets.values()]
