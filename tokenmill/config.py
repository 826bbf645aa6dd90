"""Frozen configuration objects, one per subsystem.

A Hugging Face ``config.json`` (or a llama2.c header) is converted once, here, into a
:class:`ModelConfig`; model code reads only that. Values discovered at run time (the number of
KV blocks, EOS ids from the tokenizer) live in their own objects and are never written back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.moe_config import MoEConfig
from tokenmill.layers.quantization.config import LOAD_TIME_METHODS, QuantizationConfig

QUANTIZATION_CHOICES = (*LOAD_TIME_METHODS, "gptq", "gguf", "none")
"""What ``quantization`` may name (see EngineConfig.quantization)."""

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turns ``"bfloat16"``/``"bf16"``/``torch.bfloat16`` into a torch dtype, or raises ValueError."""
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise ValueError(f"dtype {name} is not supported; choose one of float32, bfloat16, float16")
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of float32, bfloat16, float16 or auto")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts."""

    rope_type: str
    """``"default"``, ``"linear"`` (positions divided by ``factor``) or ``"llama3"``."""
    factor: float = 1.0
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above ``original_max_position_embeddings / low_freq_factor`` are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below ``original_max_position_embeddings / high_freq_factor`` stay unscaled."""
    original_max_position_embeddings: int = 8192

    SUPPORTED = ("default", "linear", "llama3")

    def __post_init__(self) -> None:
        if self.rope_type not in self.SUPPORTED:
            raise ModelLoadError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: {', '.join(self.SUPPORTED)}")
        if self.factor <= 0:
            raise ModelLoadError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of one decoder-only model, independent of its checkpoint format."""

    architecture: str
    """Class name as in ``config.json``'s ``architectures`` (e.g. ``LlamaForCausalLM``)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    """``silu`` (gated SwiGLU MLP, Llama family) or ``gelu_new`` (GPT-2)."""
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    position_embedding: str = "rope"
    """``rope`` or ``learned`` (GPT-2's ``wpe`` table)."""
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """Qwen3: RMSNorm over each head of q and k before rotary."""
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    """The dtype the checkpoint was saved in (``dtype="auto"`` uses it)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: QuantizationConfig | None = None
    """How the checkpoint's linear layers are quantized (a GPTQ checkpoint), None for float ones."""
    moe: MoEConfig | None = None
    """Mixture-of-experts layers; None for dense models."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], quantize_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Converts a Hugging Face ``config.json`` dict (and a ``quantize_config.json``, which older GPTQ
        checkpoints keep beside it); raises ModelLoadError on what we cannot run."""
        from tokenmill.models.registry import resolve_architecture

        arch = resolve_architecture(hf)
        try:
            config = cls._from_gpt2(hf) if arch == "GPT2LMHeadModel" else cls._from_llama_family(arch, hf)
        except KeyError as e:
            raise ModelLoadError(f"config.json for {arch} lacks the field {e.args[0]!r}") from None
        if hf.get("quantization_config"):
            quantization = QuantizationConfig.from_gptq(hf["quantization_config"], "config.json quantization_config")
        elif quantize_config:
            quantization = QuantizationConfig.from_gptq(quantize_config, "quantize_config.json")
        else:
            return config
        return replace(config, quantization=quantization)

    @classmethod
    def _from_llama_family(cls, arch: str, hf: dict[str, Any]) -> "ModelConfig":
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling together
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        rope_scaling = None
        if rope_type != "default":
            rope_scaling = RopeScaling(
                rope_type=rope_type, factor=float(scaling.get("factor", 1.0)),
                low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
        is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding = None
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported for {arch}; supported: silu")
        return cls(
            architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=act, rope_theta=float(theta),
            rope_scaling=rope_scaling, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias, o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=sliding, torch_dtype=_checkpoint_dtype(hf),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            moe=MoEConfig.from_hf(arch, hf))

    @classmethod
    def _from_gpt2(cls, hf: dict[str, Any]) -> "ModelConfig":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ModelLoadError("GPT-2 options scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                                 "are not supported")
        hidden = hf["n_embd"]
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise ModelLoadError(f"GPT-2 activation_function {act!r} is not supported; "
                                 "supported: gelu_new, gelu_pytorch_tanh, gelu")
        return cls(
            architecture="GPT2LMHeadModel", vocab_size=hf["vocab_size"], hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden, num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"], num_key_value_heads=hf["n_head"],
            head_dim=hidden // hf["n_head"], max_position_embeddings=hf.get("n_positions", 1024),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), hidden_act=act, position_embedding="learned",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=True, o_bias=True,
            mlp_bias=True, torch_dtype=_checkpoint_dtype(hf),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=_as_id_tuple(hf.get("eos_token_id")))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json found (expected a Hugging Face model folder)")
        quantize_path = Path(model_dir) / "quantize_config.json"
        try:
            hf = json.loads(path.read_text())
            quantize_config = json.loads(quantize_path.read_text()) if quantize_path.is_file() else None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path.parent}: a config file is not valid JSON ({e})") from None
        return cls.from_hf(hf, quantize_config)


def _checkpoint_dtype(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if str(name).removeprefix("torch.") in ("float32", "bfloat16", "float16") else "float32"


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int | None = None
    """Bytes for the KV cache pool; None: what max_num_seqs sequences of max_model_len tokens use,
    within a share of free memory (see ``default_kv_cache_memory``)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of earlier requests that share a prompt prefix."""
    kv_cache_dtype: str = "auto"
    """``auto`` (the model's dtype), ``int8`` (a float16 scale per token and head: ~2x the tokens of
    a 16-bit cache in the same memory) or ``fp8_e4m3`` (a per-tensor scale: 2x)."""
    kv_offload_memory: int | None = None
    """Bytes of CPU memory (pinned on CUDA) for a second KV tier: full prefix-cache blocks that the
    device pool evicts are kept here (least recently used out first) and loaded back on a later
    prefix hit instead of being recomputed. None: no memory tier."""
    kv_offload_folder: str | None = None
    """A folder for a disk KV tier (after the memory tier, if any): evicted prefix blocks are written
    here, one checksummed file each, and read back on a prefix hit. None: no disk tier."""
    kv_offload_disk_space: int = 4 * 2**30
    """With ``kv_offload_folder``: the most bytes its files take (least recently used out first)."""

    def __post_init__(self) -> None:
        from tokenmill.attention.kv_quant import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; "
                             f"choose one of {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        for name in ("kv_offload_memory", "kv_offload_disk_space"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
        if self.has_kv_offload and not self.enable_prefix_caching:
            raise ValueError("KV offloading (kv_offload_memory / kv_offload_folder) keeps prefix-cache blocks: "
                             "it needs enable_prefix_caching")

    @property
    def has_kv_offload(self) -> bool:
        """Whether a KV tier beyond the device pool is configured."""
        return self.kv_offload_memory is not None or self.kv_offload_folder is not None


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = 256
    """Most requests in one step."""
    max_num_batched_tokens: int = 2048
    """Most tokens (prompt chunks plus decodes) in one step."""
    max_model_len: int | None = None
    """Longest prompt plus output; longer requests are rejected when added. None: the model's context."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so that they share steps with decodes."""
    num_scheduler_steps: int = 1
    """Decode steps per scheduling round (vLLM's multi-step scheduling): where every running request
    decodes greedily with nothing that needs the host between tokens (no sampling, logprobs, processors
    or beams), nothing waits, and the runner can loop on its own (the C++ CPU decode step), one
    call runs up to this many steps, feeding each step's tokens to the next; the scheduler and the Python
    around the step run once for all of them. Tokens then arrive (and stream) in bursts of that many."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_scheduler_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be at "
                f"least max_model_len ({self.max_model_len})")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; built by ``LLM`` or the CLI."""

    model: str
    """Hugging Face folder, llama2.c ``.bin`` file, or a named random shape (see ``tokenmill.models.shapes``)."""
    tokenizer: str | None = None
    """Tokenizer path when it is not inside the model folder (llama2.c ``tokenizer.bin``)."""
    dtype: str = "auto"
    """``auto`` (the checkpoint's dtype, float32 on CPU for float16 checkpoints), float32, bfloat16, float16."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda``."""
    seed: int = 0
    """Seed for requests that give none."""
    attention_backend: str = "auto"
    """``auto`` (the C++ decode kernel on CPU when it builds), ``torch`` (portable) or ``cpu``."""
    skip_tokenizer_init: bool = False
    """Load no tokenizer: prompts must be token ids and outputs carry no text (benchmarks)."""
    quantization: str | None = None
    """Weight quantization: ``int8`` (per channel) or ``int4`` (groups) of a float checkpoint, at load;
    ``gptq`` (or None) for a GPTQ checkpoint, which is recognised from its config; ``gguf`` (or None) for
    a GGUF file's Q8_0 / Q4_0 matrices, which run as stored; ``none`` dequantizes those to the dtype."""
    quantization_group_size: int | None = None
    """int4 only: inputs per scale and zero point, 32, 64 (default), 128 or -1 (per channel)."""
    quantize_lm_head: bool = True
    """Quantize the LM head as well (int8 under int4); off keeps it in the model dtype."""
    prepack_weights: bool = True
    """On CPU, convert float linear weights to oneDNN's blocked layout (faster); off keeps the plain
    weights, which ``tokenmill quantize`` reads and rewrites."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tensor_parallel_size: int = 1
    """Processes that each hold 1/N of every layer (heads, MLP rows, vocabulary), joined with
    torch.distributed (gloo); the engine starts the N - 1 workers itself."""
    pipeline_parallel_size: int = 1
    """Processes that each hold a contiguous range of the layers (the first the embedding, the last the
    norm and LM head), as many steps in flight as there are stages; combines with tensor_parallel_size
    (tensor_parallel_size x pipeline_parallel_size processes)."""
    enable_expert_parallel: bool = False
    """Mixture-of-experts layers under tensor parallelism: each rank holds whole experts (E / N of them)
    instead of 1/N of every expert; attention stays tensor-parallel."""
    cpu_offload_gb: float = 0.0
    """CUDA: GiB of weights kept in pinned CPU memory and streamed to the GPU a unit (decoder layer, LM
    head, embedding) at a time, decoder layers first. With ``offload_folder``: the pinned part of what
    ``max_weight_memory`` leaves off the GPU, the rest on disk."""
    offload_folder: str | None = None
    """Any device, with ``max_weight_memory``: weights past that budget are written here (safetensors) and
    read back a unit at a time."""
    max_weight_memory: int | None = None
    """With ``offload_folder``: the most weight bytes kept resident."""
    offload_prefetch: bool = True
    """Start moving the next offloaded unit while the current one computes (off: when it is needed)."""
    enforce_eager: bool = False
    """CUDA: run every step's Python forward; off, decode-only steps replay CUDA graphs (one per batch-size
    bucket, captured at start-up)."""
    distributed_timeout_s: float = 120.0
    """How long a rank waits for the others (to join, in a collective, for a step's result) before failing."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be 0 or more, got {self.cpu_offload_gb}")
        if (self.offload_folder is None) != (self.max_weight_memory is None):
            raise ValueError("offload_folder and max_weight_memory go together: the folder holds the weights past "
                             f"the budget (got offload_folder={self.offload_folder!r}, "
                             f"max_weight_memory={self.max_weight_memory!r})")
        if self.cache.has_kv_offload and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError("KV offloading (kv_offload_memory / kv_offload_folder) runs in one process; got "
                             f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                             f"{self.pipeline_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be positive, got {self.distributed_timeout_s}")
        if self.quantization not in (None, *QUANTIZATION_CHOICES):
            raise ValueError(f"quantization {self.quantization!r} is not supported; "
                             f"choose one of {', '.join(QUANTIZATION_CHOICES)}")
        if self.quantization in LOAD_TIME_METHODS:
            self.load_time_quantization()  # validates the group size
        elif self.quantization_group_size is not None:
            raise ValueError("quantization_group_size applies to quantization='int4' only")

    def load_time_quantization(self) -> QuantizationConfig | None:
        """The round-to-nearest scheme to apply while loading a float checkpoint (None: none)."""
        if self.quantization not in LOAD_TIME_METHODS:
            return None
        return QuantizationConfig.load_time(self.quantization, self.quantization_group_size, self.quantize_lm_head)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r} is not supported; choose auto, cpu or cuda")
    return torch.device(device)
