"""llama2.c checkpoints: the legacy (version 0) ``.bin`` format that ``run.c`` reads.

Header: seven little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means an untied classifier follows the weights), then float32
arrays. llama2.c rotates interleaved pairs (2i, 2i+1); Hugging Face Llama rotates halves
(i, i + d/2). Permuting the rows of wq and wk per head turns one into the other exactly, so the
Llama model code serves both.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError

_HEADER = struct.Struct("<7i")


def is_llama2c_checkpoint(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".bin"


def read_llama2c(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The model config and the weights (under Hugging Face Llama names) of a llama2.c checkpoint."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise ModelLoadError(f"{path}: too short for a llama2.c header ({len(data)} bytes)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack_from(data)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or dim % n_heads or vocab == 0:
        header = (dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len)
        raise ModelLoadError(f"{path}: not a llama2.c checkpoint (header {header})")
    tied, vocab = vocab > 0, abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
        head_dim=head_dim, max_position_embeddings=seq_len, norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_ids=(2,))
    floats = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    shapes = [("embed", (vocab, dim)), ("attn_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("norm", (dim,)), ("freq_cis", (seq_len, head_dim))]
    arrays: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        size = int(torch.Size(shape).numel())
        if offset + size > floats.numel():
            raise ModelLoadError(f"{path}: truncated llama2.c checkpoint (ends inside {name!r})")
        arrays[name] = floats[offset:offset + size].view(shape)
        offset += size
    if not tied:
        if offset + vocab * dim > floats.numel():
            raise ModelLoadError(f"{path}: truncated llama2.c checkpoint (ends inside the classifier)")
        arrays["classifier"] = floats[offset:offset + vocab * dim].view(vocab, dim)
    return config, _hf_names(arrays, n_layers, n_heads, n_kv_heads)


def interleaved_to_halves(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(num_heads*d, in) rows ordered (pair, 2) per head -> ordered (2, pair): evens first, then odds."""
    out_features, in_features = w.shape
    head_dim = out_features // num_heads
    return w.view(num_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def _hf_names(a: dict[str, torch.Tensor], n_layers: int, n_heads: int, n_kv_heads: int):
    yield "model.embed_tokens.weight", a["embed"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", a["attn_norm"][i]
        yield p + "self_attn.q_proj.weight", interleaved_to_halves(a["wq"][i], n_heads)
        yield p + "self_attn.k_proj.weight", interleaved_to_halves(a["wk"][i], n_kv_heads)
        yield p + "self_attn.v_proj.weight", a["wv"][i]
        yield p + "self_attn.o_proj.weight", a["wo"][i]
        yield p + "post_attention_layernorm.weight", a["ffn_norm"][i]
        yield p + "mlp.gate_proj.weight", a["w1"][i]
        yield p + "mlp.down_proj.weight", a["w2"][i]
        yield p + "mlp.up_proj.weight", a["w3"][i]
    yield "model.norm.weight", a["norm"]
    if "classifier" in a:
        yield "lm_head.weight", a["classifier"]
