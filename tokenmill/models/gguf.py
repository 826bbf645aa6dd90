"""GGUF checkpoints (llama.cpp's format): the model config from the metadata, and the tensors under
Hugging Face names, dequantized to float32 at load (the loader casts them to the run dtype).
Architectures: ``llama`` (Llama, Mistral, SmolLM), ``qwen2``, ``qwen3`` and ``gpt2``.

Q8_0 and Q4_0 matrices of the Llama family can run as they are stored (``NATIVE_TYPES``): the reader
then yields, instead of the dequantized weight, its blocks' codes and scales (``<layer>.gguf_codes``,
``<layer>.gguf_scales``), which the layer's GGUF linear method holds (``layers/quantization/methods.py``).

Read with the ``gguf`` package (llama.cpp's own reader). GGUF lists a matrix's dimensions
innermost first, so a (out, in) weight is stored as [in, out]. llama.cpp's converter reorders the
rows of Llama-family Q and K projections per head, for its interleaved rotary layout; the same
permutation that turns llama2.c's layout into Hugging Face's undoes it. Qwen2/Qwen3 are stored
as Hugging Face has them (their rotary is the "NeoX" layout already). GPT-2's Conv1D matrices are
stored transposed, as ordinary (out, in) matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tokenmill.config import ModelConfig, RopeScaling
from tokenmill.errors import ModelLoadError

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
NATIVE_TYPES = {"Q8_0": 8, "Q4_0": 4}
"""Block types a quantized matrix holds exactly (bits per code): blocks of 32 inputs with a float16 scale d;
Q8_0 ``w = d * q`` (q int8), Q4_0 ``w = d * (q - 8)`` (q a nibble). Q4_1 (``d * q + m``) has a zero point
that is not a whole number, and K-quants have two levels of scales: both are dequantized."""
NATIVE_BLOCK = 32

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gpt2": "GPT2LMHeadModel"}

_LAYER_NAMES = {  # GGUF name inside blk.N -> Hugging Face name inside model.layers.N
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                     "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_GPT2_GLOBAL_NAMES = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                      "output_norm": "transformer.ln_f", "output": "lm_head"}


def is_gguf_file(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | Path):
    """The ``gguf`` package's reader over ``path`` (memory-mapped); ModelLoadError if it is not GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, ...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict[str, Any]:
    """Every metadata field as a Python value (the token lists and merges included)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_gguf(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The model config and the weights (under Hugging Face names, all dequantized) of a GGUF checkpoint."""
    reader = open_gguf(path)
    config = reader_config(reader, path)
    return config, gguf_weights(reader, config, path)


def reader_config(reader, path: str | Path = "") -> ModelConfig:
    """The ModelConfig of an open GGUF file."""
    return gguf_model_config(metadata(reader), {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors},
                             path)


def matrix_bits(reader, config: ModelConfig) -> dict[str, int | None]:
    """Hugging Face name -> code bits of every 2-D tensor: its ``NATIVE_TYPES`` bits, or None (another type,
    or GPT-2, whose matrices are transposed for its Conv1D layers and so are dequantized)."""
    gpt2 = config.architecture == "GPT2LMHeadModel"
    bits = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, gpt2)
        if name is not None and len(tensor.shape) == 2:
            bits[name] = None if gpt2 else NATIVE_TYPES.get(tensor.tensor_type.name)
    return bits


def gguf_model_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                      path: str | Path = "") -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata; ``tensor_shapes`` (GGUF order, innermost first)
    tell what the metadata may leave out: an untied head, biases, the vocabulary size."""
    tensor_names = set(tensor_shapes)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else tensor_shapes.get("token_embd.weight",
                                                                                                (0, 0))[-1])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if arch == "gpt2":
        return ModelConfig(
            architecture="GPT2LMHeadModel", vocab_size=int(vocab_size), hidden_size=hidden,
            intermediate_size=int(meta.get("gpt2.feed_forward_length", 4 * hidden)),
            num_hidden_layers=int(get("block_count")), num_attention_heads=num_heads, num_key_value_heads=num_heads,
            head_dim=hidden // num_heads, max_position_embeddings=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_epsilon")), hidden_act="gelu_new", position_embedding="learned",
            tie_word_embeddings="output.weight" not in tensor_names, qkv_bias=True, o_bias=True, mlp_bias=True,
            torch_dtype=_file_dtype(meta), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),))
    head_count_kv = get("attention.head_count_kv", num_heads)
    if isinstance(head_count_kv, list):  # per-layer counts: we run one for all
        if len(set(head_count_kv)) != 1:
            raise ModelLoadError(f"{path}: per-layer KV head counts {sorted(set(head_count_kv))} are not supported")
        head_count_kv = head_count_kv[0]
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise ModelLoadError(f"{path}: rope scaling {scaling_type!r} is not supported (only linear)")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1 style) are not supported")
    return ModelConfig(
        architecture=_ARCHITECTURES[arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=num_heads,
        num_key_value_heads=int(head_count_kv),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
        max_position_embeddings=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling, tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names, o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm=arch == "qwen3", torch_dtype=_file_dtype(meta),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),))


def _file_dtype(meta: dict[str, Any]) -> str:
    """``dtype="auto"``: float16/bfloat16 files run as such; Q8_0 and Q4_0 files of the Llama family as
    bfloat16, so that their matrices run as stored (as llama.cpp runs them, 8-bit activations in integer
    dot products); other quantized ones as float32."""
    file_type = meta.get("general.file_type")
    if file_type in (2, 7) and meta.get("general.architecture") != "gpt2":  # MOSTLY_Q4_0, MOSTLY_Q8_0
        return "bfloat16"
    return {1: "float16", 32: "bfloat16"}.get(file_type, "float32")


def dequantize(tensor, path: str | Path = "") -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor of its Hugging Face shape (outermost dimension first)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: tensor {tensor.name} has type {kind}; supported: {', '.join(SUPPORTED_TYPES)}")
    values = quants.dequantize(tensor.data, tensor.tensor_type).astype("float32", copy=False)
    if not values.flags.writeable:  # float32 tensors come straight from the read-only memory map
        values = values.copy()
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return torch.from_numpy(values.reshape(shape))


def _hf_name(gguf_name: str, gpt2: bool) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight or bias
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        mapped = (_GPT2_LAYER_NAMES if gpt2 else _LAYER_NAMES).get(part)
        return None if mapped is None else f"{'transformer.h' if gpt2 else 'model.layers'}.{layer}.{mapped}.{suffix}"
    mapped = (_GPT2_GLOBAL_NAMES if gpt2 else _GLOBAL_NAMES).get(stem)
    return None if mapped is None else f"{mapped}.{suffix}"


def block_codes(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 or Q4_0 matrix as stored: codes (rows, inputs) uint8 (Q8_0: q + 128; Q4_0: the nibble q, a
    block's 16 low nibbles its first 16 inputs, its high ones the next 16) and the blocks' float16 scales d
    as float32 (rows, inputs / 32)."""
    rows, in_features = (int(d) for d in reversed(tensor.shape))
    blocks = tensor.data.reshape(rows * in_features // NATIVE_BLOCK, -1)  # (blocks, bytes) uint8: d, then q
    d = blocks[:, :2].copy().view("float16").astype("float32")
    if tensor.tensor_type.name == "Q8_0":
        codes = blocks[:, 2:].view("int8").astype("int16") + 128
    else:
        codes = np.concatenate([blocks[:, 2:] & 0xF, blocks[:, 2:] >> 4], axis=1)
    return (torch.from_numpy(codes.astype("uint8").reshape(rows, in_features)),
            torch.from_numpy(d.reshape(rows, in_features // NATIVE_BLOCK)))


def tensor_codes(reader, gguf_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_codes`` of the tensor named ``gguf_name`` (``token_embd.weight``: a tied LM head's)."""
    return block_codes(next(t for t in reader.tensors if t.name == gguf_name))


def gguf_weights(reader, config: ModelConfig, path: str | Path,
                 native: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors under Hugging Face names, dequantized to float32; those named in ``native`` (weights
    of ``matrix_bits``) as their codes and scales instead (``<layer>.gguf_codes``, ``<layer>.gguf_scales``)."""
    from tokenmill.models.llama2c import interleaved_to_halves

    unpermute = config.architecture == "LlamaForCausalLM"
    gpt2 = config.architecture == "GPT2LMHeadModel"
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, gpt2)
        if name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r} for {config.architecture}")
        if name in native:
            rows = dict(zip(("gguf_codes", "gguf_scales"), block_codes(tensor)))
        else:
            weight = dequantize(tensor, path)
            if gpt2 and weight.dim() == 2 and name.startswith("transformer.h."):
                weight = weight.t()  # back to GPT-2's Conv1D (in, out) layout, which the model's loader expects
            rows = {"weight" if name.endswith(".weight") else "bias": weight}
        if unpermute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            num_heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            for key, value in rows.items():  # a bias, the codes and the scales are reordered like the rows
                rows[key] = interleaved_to_halves(value if value.dim() == 2 else value[:, None],
                                                  num_heads).reshape(value.shape)
        stem = name.rpartition(".")[0]
        for key, value in rows.items():
            yield f"{stem}.{key}", value
