"""Model shapes for analysis: presets by name, or any Hugging Face ``config.json``.

Unlike ``ModelConfig`` (what the engine can run), a shape only needs the sizes, so it covers
more families (OPT, Mixtral) and counts parameters exactly: attention with grouped-query heads,
gated or plain MLPs, experts and router, biases, norms, embeddings and an untied head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.analysis.hardware import AnalysisError


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool = True
    """SwiGLU (gate, up, down) or a plain two-matrix MLP (OPT, GPT-2)."""
    num_experts: int = 1
    experts_per_token: int = 1
    expert_intermediate_size: int = 0
    """Each expert's intermediate size (Qwen-MoE's ``moe_intermediate_size``); 0: ``intermediate_size``."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: a gated dense expert beside the routed ones in every expert layer; 0 for none."""
    num_dense_layers: int = 0
    """Layers with a dense MLP of ``intermediate_size`` instead of experts (Qwen's ``mlp_only_layers``,
    ``decoder_sparse_step``)."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_norm: bool = False
    """LayerNorm (weight and bias) rather than RMSNorm (weight only)."""
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    learned_positions: int = 0
    """Rows of a learned position table (GPT-2, OPT), 0 for rotary."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise AnalysisError(f"model {self.name}: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise AnalysisError(f"model {self.name}: num_heads {self.num_heads} is not a multiple of "
                                f"num_kv_heads {self.num_kv_heads}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    # ---- exact parameter counts -------------------------------------------------------------
    def attention_params(self) -> int:
        q, kv, h = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size
        n = h * q + 2 * h * kv + q * h
        n += (q + 2 * kv) if self.qkv_bias else 0
        n += h if self.o_bias else 0
        n += 2 * self.head_dim if self.qk_norm else 0
        return n

    @property
    def num_sparse_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    def _mlp(self, intermediate: int) -> int:
        h, i = self.hidden_size, intermediate
        n = (3 if self.gated_mlp else 2) * h * i
        if self.mlp_bias:
            n += (2 * i if self.gated_mlp else i) + h
        return n

    def expert_mlp_params(self) -> int:
        return self._mlp(self.expert_intermediate_size or self.intermediate_size)

    def dense_mlp_params(self) -> int:
        return self._mlp(self.intermediate_size)

    def mlp_params(self) -> int:
        """One expert layer's router, experts and shared expert (with its gate); a dense layer's MLP."""
        if not self.is_moe:
            return self.dense_mlp_params()
        shared = self._mlp(self.shared_expert_intermediate_size) + self.hidden_size if \
            self.shared_expert_intermediate_size else 0
        return self.num_experts * self.expert_mlp_params() + self.hidden_size * self.num_experts + shared

    def norm_params(self) -> int:
        return (2 if self.layer_norm else 1) * self.hidden_size

    def layer_params(self) -> int:
        """An expert layer's (a dense one's for dense models)."""
        return self.attention_params() + self.mlp_params() + 2 * self.norm_params()

    def all_layer_params(self) -> int:
        dense = self.num_dense_layers * (self.attention_params() + self.dense_mlp_params() + 2 * self.norm_params())
        return (self.num_layers - self.num_dense_layers) * self.layer_params() + dense

    def embedding_params(self) -> int:
        n = self.vocab_size * self.hidden_size + self.learned_positions * self.hidden_size
        return n + (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    def total_params(self) -> int:
        return self.all_layer_params() + self.embedding_params() + self.norm_params()

    def active_params_per_token(self) -> int:
        """Parameters a token passes through (MoE: only its routed experts)."""
        inactive = (self.num_experts - self.experts_per_token) * self.expert_mlp_params() if self.is_moe else 0
        return self.total_params() - self.num_sparse_layers * inactive

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "config.json") -> "ModelShape":
        """Any decoder ``config.json``: Llama, Mistral, Mixtral, Qwen2/3, GPT-2, OPT."""
        try:
            model_type = hf.get("model_type", "")
            if model_type == "gpt2" or "n_embd" in hf:
                h = hf["n_embd"]
                return cls(name=name, num_layers=hf["n_layer"], hidden_size=h, num_heads=hf["n_head"],
                           num_kv_heads=hf["n_head"], head_dim=h // hf["n_head"],
                           intermediate_size=hf.get("n_inner") or 4 * h, vocab_size=hf["vocab_size"], gated_mlp=False,
                           qkv_bias=True, o_bias=True, mlp_bias=True, layer_norm=True, tie_word_embeddings=True,
                           learned_positions=hf.get("n_positions", 1024))
            if model_type == "opt" or "ffn_dim" in hf:
                h = hf["hidden_size"]
                bias = hf.get("enable_bias", True)
                return cls(name=name, num_layers=hf["num_hidden_layers"], hidden_size=h,
                           num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_attention_heads"],
                           head_dim=h // hf["num_attention_heads"], intermediate_size=hf["ffn_dim"],
                           vocab_size=hf["vocab_size"], gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                           layer_norm=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
                           learned_positions=hf.get("max_position_embeddings", 2048) + 2)
            h, heads = hf["hidden_size"], hf["num_attention_heads"]
            qwen2 = model_type in ("qwen2", "qwen2_moe")
            attention_bias = bool(hf.get("attention_bias", False))
            num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 1
            layers = hf["num_hidden_layers"]
            dense = 0
            if model_type in ("qwen2_moe", "qwen3_moe"):  # some layers may keep a dense MLP
                step, only = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or ())
                dense = sum(1 for i in range(layers) if i in only or (i + 1) % step)
            return cls(name=name, num_layers=layers, hidden_size=h, num_heads=heads,
                       num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or h // heads,
                       intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                       num_experts=num_experts, experts_per_token=hf.get("num_experts_per_tok") or 1,
                       expert_intermediate_size=hf.get("moe_intermediate_size") or 0,
                       shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
                       num_dense_layers=dense if num_experts > 1 else 0,
                       qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
                       mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=model_type in ("qwen3", "qwen3_moe"),
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise AnalysisError(f"{name}: malformed model config, missing {e.args[0]!r}") from None
        except TypeError as e:
            raise AnalysisError(f"{name}: malformed model config ({e})") from None


def _preset(name, layers, hidden, heads, kv, inter, vocab, **kw) -> ModelShape:
    return ModelShape(name=name, num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv,
                      head_dim=kw.pop("head_dim", hidden // heads), intermediate_size=inter, vocab_size=vocab, **kw)


_OPT = dict(gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True, layer_norm=True, tie_word_embeddings=True,
            learned_positions=2050)
MODEL_PRESETS: dict[str, ModelShape] = {m.name: m for m in [
    _preset("opt-175b", 96, 12288, 96, 96, 49152, 50272, **_OPT),
    _preset("opt-13b", 40, 5120, 40, 40, 20480, 50272, **_OPT),
    _preset("gpt2", 12, 768, 12, 12, 3072, 50257, gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
            layer_norm=True, tie_word_embeddings=True, learned_positions=1024),
    _preset("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    _preset("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
    _preset("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
    _preset("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
    _preset("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
    _preset("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, tie_word_embeddings=True),
    _preset("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, qkv_bias=True, tie_word_embeddings=True),
    _preset("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, qkv_bias=True),
    _preset("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, qkv_bias=True),
    _preset("mistral-7b", 32, 4096, 32, 8, 14336, 32000),
    _preset("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, num_experts=8, experts_per_token=2),
    _preset("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tie_word_embeddings=True),
]}


def get_model_shape(model: str) -> ModelShape:
    """A preset name, a ``config.json`` path, or a folder containing one."""
    if model.lower() in MODEL_PRESETS:
        return MODEL_PRESETS[model.lower()]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise AnalysisError(f"unknown model {model!r}: not a preset ({', '.join(MODEL_PRESETS)}) "
                            "nor a config.json path or folder")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnalysisError(f"{path}: malformed model config, not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise AnalysisError(f"{path}: malformed model config, expected a JSON object")
    return ModelShape.from_hf(hf, name=str(model))
