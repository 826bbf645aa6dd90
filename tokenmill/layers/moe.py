"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen2-MoE, Qwen3-MoE), routed as transformers routes.

A router scores each token against every expert (softmax in float32), keeps the ``top_k`` best,
and renormalises their weights where the config says so (Mixtral always, Qwen with
``norm_topk_prob``). The experts then run grouped: the (token, choice) pairs are sorted by
expert, each expert multiplies its contiguous slice of rows in two matrix products, and the
weighted rows are added back to their tokens. The Python loop is over experts, never tokens.

Worked example, 3 tokens, top 2 of 4 experts: topk_ids = [[2, 0], [1, 2], [2, 3]] flatten to
[2, 0, 1, 2, 2, 3]; a stable sort by expert gives rows (token, expert) = (0, 0), (1, 1), (0, 2),
(1, 2), (2, 2), (2, 3): expert 2 multiplies its three rows in one GEMM.

Expert weights are stacked per layer: ``w13`` (E, 2 * I, H) holds each expert's gate and up
projections, ``w2`` (E, H, I) its down projection. Checkpoints keep one tensor per expert and
projection (``experts.{e}.gate_proj.weight`` or Mixtral's ``w1``/``w3``/``w2``); the loader gives
each one to its slice (``FusedMoE.load_expert``). Experts stay in the model's float dtype under
weight quantization, like the router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import MoEConfig
from tokenmill.distributed.parallel_state import tensor_parallel_group
from tokenmill.errors import ModelLoadError
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.linear import new_parameter


class GateLinear(nn.Module):
    """A small float projection (the router's (E, H), Qwen2-MoE's shared-expert gate (1, H)) that
    weight quantization leaves alone: its outputs choose experts, not values."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = new_parameter(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, out_features)
        return F.linear(x, self.weight)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits (T, E) -> (weights (T, top_k) float32, expert ids (T, top_k) int64), best first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The experts of one layer: ``forward(x (T, H), weights (T, k), ids (T, k)) -> (T, H)``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = new_parameter(num_experts, 2 * intermediate_size, hidden_size)
        self.w2 = new_parameter(num_experts, hidden_size, intermediate_size)
        for param, parts in ((self.w13, ("gate", "up")), (self.w2, ("down",))):
            param.weight_loader = self.load_expert
            param.shard_ids = tuple((e, part) for e in range(num_experts) for part in parts)

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """Copies expert ``e``'s ``part`` ("gate", "up" or "down") into its slice of ``param``."""
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ModelLoadError(f"expert {expert} is out of range: the config has {self.num_experts} experts")
        target = param.data[expert]
        if part in ("gate", "up"):
            rows = self.intermediate_size
            target = target.narrow(0, 0 if part == "gate" else rows, rows)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ModelLoadError(f"expert {part} weight shape {tuple(loaded.shape)} does not match the "
                                 f"model's {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                weights_dtype: torch.dtype) -> torch.Tensor:
        """Each token's experts' outputs, weighted (in ``weights_dtype``, as the reference multiplies)
        and summed in expert order."""
        num_tokens, top_k = ids.shape
        flat_ids = ids.flatten()  # (T * k,)
        order = flat_ids.argsort(stable=True)  # (T * k,) rows grouped by expert, tokens in order
        token_of_row = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # rows per expert (host)
        rows = x[token_of_row]  # (T * k, H)
        out_rows = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                segment = rows[start:start + count]
                hidden = silu_and_mul(F.linear(segment, self.w13[expert]))  # (n, I)
                out_rows[start:start + count] = F.linear(hidden, self.w2[expert])
                start += count
        row_weights = weights.flatten()[order].to(weights_dtype).unsqueeze(1)  # (T * k, 1)
        weighted = (out_rows.to(weights_dtype) * row_weights).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, weighted)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert), in place of a layer's dense MLP."""

    def __init__(self, hidden_size: int, moe: MoEConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        if tensor_parallel_group().size > 1:
            raise ModelLoadError("mixture-of-experts models do not run with tensor_parallel_size > 1 yet; use 1")
        self.moe = moe
        self.gate = GateLinear(hidden_size, moe.num_experts)
        self.experts = FusedMoE(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = GateLinear(hidden_size, 1) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        weights, ids = route(self.gate(x), self.moe.num_experts_per_tok, self.moe.norm_topk_prob)
        # Mixtral weighs the expert outputs in float32, Qwen in the model's dtype.
        weights_dtype = torch.float32 if self.moe.router_weights_in_float32 else x.dtype
        out = self.experts(x, weights, ids, weights_dtype)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
