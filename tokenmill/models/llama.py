"""Llama 2/3, Mistral, Qwen2, Qwen3 and their mixture-of-experts kin (Mixtral, Qwen2-MoE, Qwen3-MoE):
one decoder family whose differences are config flags.

Attribute names mirror the Hugging Face checkpoints (``model.layers.N.self_attn...``) except
where projections are merged: q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
(``stacked_params`` tells the loader which checkpoint tensor goes where), and where experts are
stacked: ``mlp.experts.{e}.gate_proj`` (Mixtral: ``block_sparse_moe.experts.{e}.w1``) into
``mlp.experts.w13`` (``expert_params``).
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from tokenmill.attention.layer import Attention
from tokenmill.config import ModelConfig
from tokenmill.distributed.parallel_state import partition, pipeline_stage, tensor_parallel_group
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.embedding import VocabParallelEmbedding
from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RopeInputs, RotaryEmbedding
from tokenmill.models.pipeline import StageTensors, stage_holds, stage_layers


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.rotary = rotary
        tp = tensor_parallel_group()  # this rank's heads: all of them in one process
        _, self.num_heads = partition(cfg.num_attention_heads, tp, "attention heads")
        _, self.num_kv_heads = partition(cfg.num_key_value_heads, tp, "KV heads", replicate=True)
        self.head_dim = cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size},
                                     bias=cfg.qkv_bias, parallel="column", unit_sizes=dict.fromkeys("qkv", cfg.head_dim))
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias, parallel="row")
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5)
        self.sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]

    def forward(self, rope: RopeInputs, x: torch.Tensor) -> torch.Tensor:  # x (T, H)
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q_size + 2 * kv_size), a fresh contiguous tensor
        q_size, kv_size, _ = self.sizes
        v = qkv[:, q_size + kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k sit side by side at the start of each qkv row: rotate them together, in place.
            self.rotary.rotate_(rope, qkv, self.num_heads + self.num_kv_heads, self.head_dim)
            q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size:q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
        else:
            # Contiguous, so that the in-place rotation below rotates these very tensors.
            q = self.q_norm(qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)).contiguous()
            k = self.k_norm(qkv[:, q_size:q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)).contiguous()
            self.rotary.rotate_(rope, q.view(num_tokens, -1), self.num_heads, self.head_dim)
            self.rotary.rotate_(rope, k.view(num_tokens, -1), self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v))  # (T, H)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {0: size, 1: size}, bias=cfg.mlp_bias, parallel="column")
        self.down_proj = Linear(size, cfg.hidden_size, bias=cfg.mlp_bias, parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def feed_forward(cfg: ModelConfig, layer_index: int) -> nn.Module:
    """Layer ``layer_index``'s MLP: dense, or an expert block where the MoE config puts one."""
    moe = cfg.moe
    if moe is None or not moe.sparse_layers[layer_index]:
        return LlamaMLP(cfg)
    shared = LlamaMLP(cfg, moe.shared_expert_intermediate_size) if moe.shared_expert_intermediate_size else None
    return SparseMoeBlock(cfg.hidden_size, moe, shared)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer_index: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary)
        self.mlp = feed_forward(cfg, layer_index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, rope: RopeInputs, hidden: torch.Tensor | None,
                residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block. ``residual`` (T, H) is the float32 residual stream; ``hidden`` is the previous
        block's output not yet added to it (None for the first block). Each add is fused into the
        norm that follows it. Returns this block's (hidden, residual)."""
        h = self.input_layernorm(residual, add=hidden)
        h = self.post_attention_layernorm(residual, add=self.self_attn(rope, h))
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """The decoder stack; under pipeline parallelism only this stage's part of it (see models/pipeline.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.stage = pipeline_stage()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if self.stage.is_first else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers, self.owned = stage_layers(self.stage, cfg.num_hidden_layers,
                                               lambda i: LlamaDecoderLayer(cfg, self.rotary, i))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if self.stage.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                received: StageTensors | None = None) -> torch.Tensor | StageTensors:
        """hidden (T, H) after the final norm; a stage before the last returns its (hidden, residual),
        and a stage after the first starts from the previous stage's instead of ``input_ids``."""
        if received is None:
            embedded = self.embed_tokens(input_ids)  # (T, H) in the model's dtype
            residual = embedded.float()  # the residual stream stays in float32 (a fresh tensor: updated in place)
            hidden, dtype = None, embedded.dtype
        else:
            hidden, residual = received.tensors["hidden"], received.tensors["residual"]
            dtype = hidden.dtype
        rope = self.rotary.prepare(positions, dtype)  # shared by all layers
        for layer in islice(self.layers, self.owned.start, self.owned.stop):  # (the quantizer may truncate the list)
            hidden, residual = layer(rope, hidden, residual)
        if not self.stage.is_last:
            return StageTensors({"hidden": hidden, "residual": residual})
        return self.norm(residual, add=hidden)


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM: ``forward(input_ids (T,), positions (T,)) -> hidden (T, H)``."""

    stacked_params = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    expert_params = {"gate_proj": ("w13", "gate"), "up_proj": ("w13", "up"), "down_proj": ("w2", "down"),
                     "w1": ("w13", "gate"), "w3": ("w13", "up"), "w2": ("w2", "down")}
    """``experts.{e}.<key>.weight`` -> ``experts.<param>`` with shard (e, part): one checkpoint tensor per
    expert and projection (Qwen's names, then Mixtral's)."""

    def __init__(self, config: ModelConfig, prefix: str = ""):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.stage = stage = self.model.stage
        self.lm_head = Linear(config.hidden_size, config.vocab_size, parallel="vocab") if stage.is_last else None
        if config.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight  # one parameter, loaded once

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                received: StageTensors | None = None) -> torch.Tensor | StageTensors:
        return self.model(input_ids, positions, received)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V) in the model's dtype (gathered from every rank's vocabulary slice)."""
        logits = self.lm_head(hidden)
        if self.lm_head.parallel:
            logits = self.lm_head.tp.all_gather_last_dim(logits)[:, :self.config.vocab_size]
        return logits

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers (all of them in one process), in order."""
        return [self.model.layers[i].self_attn.attn for i in self.model.owned]

    def checkpoint_name(self, name: str) -> str | None:
        """Maps a checkpoint tensor name to ours; None for tensors to skip."""
        stage = self.model.stage
        if self.config.tie_word_embeddings:
            if name.startswith("lm_head."):
                return None  # tied: some checkpoints still save the shared matrix twice
            if name.startswith("model.embed_tokens.") and stage.is_last and not stage.is_first:
                return "lm_head." + name.removeprefix("model.embed_tokens.")  # the head's own copy on the last stage
        if "rotary_emb.inv_freq" in name or not stage_holds(name, stage, self.model.owned, "model.layers.",
                                                            ("model.embed_tokens.",), ("model.norm.", "lm_head.")):
            return None
        return name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the expert block
