"""GPT-2: learned positions, LayerNorm, tanh GELU, and Conv1D weights stored as (in, out).

Parameters mirror the checkpoint's names (``transformer.h.N.attn.c_attn``); the Conv1D
matrices are transposed once at load time so that every projection is an ordinary Linear. Under
tensor parallelism ``c_attn`` and ``c_fc`` split by outputs (``c_attn`` by heads of q, k and v
each), the two ``c_proj`` by inputs, the token embedding and LM head by vocabulary rows; the
position embedding is whole on every rank.
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.layer import Attention
from tokenmill.config import ModelConfig
from tokenmill.distributed.parallel_state import partition, pipeline_stage
from tokenmill.errors import ModelLoadError
from tokenmill.layers.activation import gelu
from tokenmill.layers.embedding import VocabParallelEmbedding
from tokenmill.layers.linear import Linear, default_weight_loader, new_parameter
from tokenmill.layers.norm import LayerNorm
from tokenmill.models.pipeline import StageTensors, stage_holds, stage_layers


def _transposed_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    default_weight_loader(param, loaded.t())


class Conv1D(Linear):
    """A Linear whose checkpoint weight is stored transposed, (in, out)."""

    def __init__(self, in_features: int, out_features: int, parallel: str | None = None):
        super().__init__(in_features, out_features, bias=True, parallel=parallel)
        if not self.parallel:
            self.weight.weight_loader = _transposed_loader

    def _load_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        super()._load_slice(param, loaded.t() if param is self.weight else loaded, shard_id)


class FusedQKV(Conv1D):
    """GPT-2's ``c_attn``: q, k and v side by side in one (in, 3 * H) tensor. Column-parallel by heads:
    each rank holds its heads' rows of all three, [q_r; k_r; v_r]."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__(hidden_size, 3 * hidden_size, parallel="column")
        partition(num_heads, self.tp, "attention heads")  # a clear error when the degree does not divide them

    def _load_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param is self.weight:
            loaded = loaded.t()  # (3H, H)
        dim, pack = getattr(param, "output_dim", 0), getattr(param, "pack_factor", 1)
        if dim is None:  # GPTQ's g_idx: the inputs' groups, whole on every rank
            default_weight_loader(param, loaded)
            return
        part, local = self.full_out_features // 3 // pack, self.out_features // 3 // pack  # stored elements
        if loaded.shape[dim] != 3 * part:
            raise ModelLoadError(f"c_attn tensor {tuple(loaded.shape)} does not hold q, k and v of "
                                 f"{self.full_out_features // 3} outputs each along dimension {dim}")
        pieces = [loaded.narrow(dim, i * part + self.tp.rank * local, local) for i in range(3)]
        default_weight_loader(param, torch.cat(pieces, dim))


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_attn = FusedQKV(cfg.hidden_size, cfg.num_attention_heads)
        _, self.num_heads = partition(cfg.num_attention_heads, self.c_attn.tp, "attention heads")  # this rank's
        self.head_dim = cfg.head_dim
        self.c_proj = Conv1D(cfg.hidden_size, cfg.hidden_size, parallel="row")
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H)
        num_tokens = x.shape[0]
        q, k, v = (t.view(num_tokens, self.num_heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size, parallel="column")
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size, parallel="row")
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(gelu(self.c_fc(x), self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The decoder stack; under pipeline parallelism only this stage's part of it (see models/pipeline.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.stage = pipeline_stage()
        if self.stage.is_first:
            self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
            self.wpe = nn.Module()
            self.wpe.weight = new_parameter(cfg.max_position_embeddings, cfg.hidden_size)
        self.h, self.owned = stage_layers(self.stage, cfg.num_hidden_layers, lambda i: GPT2Block(cfg))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps) if self.stage.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                received: StageTensors | None = None) -> torch.Tensor | StageTensors:
        if received is None:
            x = self.wte(input_ids) + F.embedding(positions, self.wpe.weight)  # (T, H)
        else:
            x = received.tensors["hidden"]
        for block in islice(self.h, self.owned.start, self.owned.stop):  # (the quantizer may truncate the list)
            x = block(x)
        return self.ln_f(x) if self.stage.is_last else StageTensors({"hidden": x})


class GPT2LMHeadModel(nn.Module):
    """GPT-2 causal LM: ``forward(input_ids (T,), positions (T,)) -> hidden (T, H)``."""

    stacked_params: dict = {}

    def __init__(self, config: ModelConfig, prefix: str = ""):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.stage = stage = self.transformer.stage
        self.lm_head = Linear(config.hidden_size, config.vocab_size, parallel="vocab") if stage.is_last else None
        if config.tie_word_embeddings and stage.is_first and stage.is_last:
            self.lm_head.weight = self.transformer.wte.weight  # one parameter, loaded once

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                received: StageTensors | None = None) -> torch.Tensor | StageTensors:
        return self.transformer(input_ids, positions, received)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V) in the model's dtype (gathered from every rank's vocabulary slice)."""
        logits = self.lm_head(hidden)
        if self.lm_head.parallel:
            logits = self.lm_head.tp.all_gather_last_dim(logits)[:, :self.config.vocab_size]
        return logits

    def attention_layers(self) -> list[Attention]:
        """This stage's attention layers (all of them in one process), in order."""
        return [self.transformer.h[i].attn.attn for i in self.transformer.owned]

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # causal-mask buffers of old checkpoints
        stage = self.transformer.stage
        if name.startswith("lm_head."):
            return None if self.config.tie_word_embeddings or not stage.is_last else name
        name = name if name.startswith("transformer.") else "transformer." + name
        if name.startswith("transformer.wte.") and self.config.tie_word_embeddings and stage.is_last \
                and not stage.is_first:
            return "lm_head." + name.removeprefix("transformer.wte.")  # the head's own copy on the last stage
        if not stage_holds(name, stage, self.transformer.owned, "transformer.h.", ("transformer.wte.", "transformer.wpe."),
                           ("transformer.ln_f.",)):
            return None
        return name
