"""The mixture-of-experts part of a model's configuration, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ModelLoadError


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts feed-forward layers (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    num_experts: int
    num_experts_per_tok: int
    """top_k: the experts each token is sent to."""
    expert_intermediate_size: int
    norm_topk_prob: bool
    """Renormalise the top_k routing weights to sum to 1 (Mixtral always; Qwen when the config says)."""
    sparse_layers: tuple[bool, ...]
    """Per layer: True for an expert block, False for a dense MLP (Qwen's ``mlp_only_layers`` and
    ``decoder_sparse_step``)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: a dense expert every token also goes through, gated by a sigmoid; 0 for none."""
    router_weights_in_float32: bool = False
    """Mixtral weighs expert outputs in float32; Qwen casts the weights to the model's dtype first."""

    def __post_init__(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelLoadError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) must be between "
                                 f"1 and num_experts ({self.num_experts})")
        if self.expert_intermediate_size <= 0:
            raise ModelLoadError(f"model config: the experts' intermediate size must be positive, "
                                 f"got {self.expert_intermediate_size}")

    @classmethod
    def from_hf(cls, arch: str, hf: dict[str, Any]) -> "MoEConfig | None":
        """The MoE part of a Hugging Face config, None for dense architectures."""
        layers = range(hf["num_hidden_layers"])
        if arch == "MixtralForCausalLM":
            return cls(num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                       expert_intermediate_size=hf["intermediate_size"], norm_topk_prob=True,
                       sparse_layers=tuple(True for _ in layers), router_weights_in_float32=True)
        if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            return None
        num_experts = hf.get("num_experts") or hf["num_local_experts"]
        step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or ())
        shared = hf.get("shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
        return cls(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                   expert_intermediate_size=hf["moe_intermediate_size"],
                   norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                   sparse_layers=tuple(i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in layers),
                   shared_expert_intermediate_size=shared or 0)
