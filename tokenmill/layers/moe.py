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

from tokenmill.moe_config import MoEConfig
from tokenmill.distributed.parallel_state import partition, tensor_parallel_group
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
    """The experts of one layer: ``forward(x (T, H), weights (T, k), ids (T, k)) -> (T, H)``.

    Over a tensor-parallel group of N ranks (the tokens are on every rank), either each rank holds
    1/N of every expert's intermediate rows (tensor parallel, the default), or whole experts,
    ranks r * E // N .. (r + 1) * E // N - 1 (``expert_parallel``). Either way a rank's output is a
    partial sum that the block all-reduces.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.tp = tensor_parallel_group()
        self.num_experts = num_experts
        self.expert_parallel = self.tp.size > 1 and self.tp.expert_parallel
        if self.expert_parallel:
            self.first_expert = self.tp.rank * num_experts // self.tp.size
            self.num_local_experts = (self.tp.rank + 1) * num_experts // self.tp.size - self.first_expert
            if self.num_local_experts == 0:
                raise ModelLoadError(f"expert parallelism over {self.tp.size} ranks leaves rank {self.tp.rank} "
                                     f"without any of the {num_experts} experts; use at most {num_experts} ranks")
            self.row_start, self.intermediate_size = 0, intermediate_size
        else:
            self.first_expert, self.num_local_experts = 0, num_experts
            self.row_start, self.intermediate_size = partition(intermediate_size, self.tp, "expert intermediate rows")
        self.w13 = new_parameter(self.num_local_experts, 2 * self.intermediate_size, hidden_size)
        self.w2 = new_parameter(self.num_local_experts, hidden_size, self.intermediate_size)
        local = range(self.first_expert, self.first_expert + self.num_local_experts)
        for param, parts in ((self.w13, ("gate", "up")), (self.w2, ("down",))):
            param.weight_loader = self.load_expert
            param.shard_ids = tuple((e, part) for e in local for part in parts)

    def load_expert(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """Copies this rank's slice of expert ``e``'s ``part`` ("gate", "up" or "down") into ``param``
        (an expert another rank holds is skipped)."""
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ModelLoadError(f"expert {expert} is out of range: the config has {self.num_experts} experts")
        local = expert - self.first_expert
        if not 0 <= local < self.num_local_experts:
            return
        rows = self.intermediate_size
        if part in ("gate", "up"):
            target = param.data[local].narrow(0, 0 if part == "gate" else rows, rows)
            full = (self.tp.size * rows if not self.expert_parallel else rows, target.shape[1])
            source = loaded.narrow(0, self.row_start, rows) if tuple(loaded.shape) == full else None
        else:
            target = param.data[local]
            full = (target.shape[0], self.tp.size * rows if not self.expert_parallel else rows)
            source = loaded.narrow(1, self.row_start, rows) if tuple(loaded.shape) == full else None
        if source is None:
            raise ModelLoadError(f"expert {part} weight shape {tuple(loaded.shape)} does not match the model's {full}")
        target.copy_(source)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                weights_dtype: torch.dtype) -> torch.Tensor:
        """Each token's experts' outputs (this rank's share), weighted (in ``weights_dtype``, as the
        reference multiplies) and summed in expert order."""
        num_tokens, top_k = ids.shape
        flat_ids = ids.flatten()  # (T * k,)
        order = flat_ids.argsort(stable=True)  # (T * k,) rows grouped by expert, tokens in order
        token_of_row = order // top_k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # rows per expert (host)
        rows = x[token_of_row]  # (T * k, H)
        out_rows = torch.zeros_like(rows)  # rows of experts other ranks hold stay 0
        start = 0
        for expert, count in enumerate(counts):
            local = expert - self.first_expert
            if count and 0 <= local < self.num_local_experts:
                segment = rows[start:start + count]
                hidden = silu_and_mul(F.linear(segment, self.w13[local]))  # (n, I)
                out_rows[start:start + count] = F.linear(hidden, self.w2[local])
            start += count
        row_weights = weights.flatten()[order].to(weights_dtype).unsqueeze(1)  # (T * k, 1)
        weighted = (out_rows.to(weights_dtype) * row_weights).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, weighted)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert), in place of a layer's dense MLP."""

    def __init__(self, hidden_size: int, moe: MoEConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.gate = GateLinear(hidden_size, moe.num_experts)
        self.experts = FusedMoE(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = GateLinear(hidden_size, 1) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        weights, ids = route(self.gate(x), self.moe.num_experts_per_tok, self.moe.norm_topk_prob)
        # Mixtral weighs the expert outputs in float32, Qwen in the model's dtype.
        weights_dtype = torch.float32 if self.moe.router_weights_in_float32 else x.dtype
        out = self.experts.tp.all_reduce(self.experts(x, weights, ids, weights_dtype))  # ranks' partial sums
        if self.shared_expert is not None:  # row-parallel inside: it sums over the ranks itself
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
