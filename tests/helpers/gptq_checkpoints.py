"""GPTQ checkpoints written by the tests' own packer (numpy, independent of tokenmill's), from a
float transformers model, plus the float reference model holding exactly the weights the
checkpoint encodes: ``scale[g_idx[k]] * (q[k] - zero[g_idx[k]])``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from helpers.checkpoints import _scale_up, train_tokenizer

QUANTIZED_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                      "c_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class GPTQSpec:
    bits: int = 4
    group_size: int = 32
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"  # "gptq" (v1: zeros stored minus one) or "gptq_v2"
    skip: tuple[str, ...] = ()  # module suffixes left in float (as quantizers do for odd shapes)
    config_file: str = "config.json"  # or "quantize_config.json" (older AutoGPTQ)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """(K, N) codes -> (K * bits / 32, N) int32: code of row k at bits (k % pack) * bits of word k // pack."""
    pack = 32 // bits
    words = np.zeros((codes.shape[0] // pack, codes.shape[1]), dtype=np.uint32)
    for j in range(pack):
        words |= codes[j::pack].astype(np.uint32) << np.uint32(bits * j)
    return words.view(np.int32)


def _pack_cols(codes: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(_pack_rows(np.ascontiguousarray(codes.T), bits).T)


def quantize_gptq_layer(weight: torch.Tensor, spec: GPTQSpec, order: torch.Tensor):
    """weight (N, K) -> (checkpoint tensors, the dequantized (N, K) weight they encode). ``order``:
    the act-order permutation of the inputs (used when ``spec.desc_act``)."""
    out_features, in_features = weight.shape
    size = in_features if spec.group_size == -1 else spec.group_size
    num_groups = -(-in_features // size)
    if spec.desc_act:  # act-order: inputs visited in the order of decreasing Hessian diagonal
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[order] = torch.arange(in_features) // size
    else:
        g_idx = torch.arange(in_features) // size
    max_code = 2**spec.bits - 1
    scales = torch.empty(num_groups, out_features)
    zeros = torch.empty(num_groups, out_features, dtype=torch.int64)
    codes = torch.empty(in_features, out_features, dtype=torch.int64)  # (K, N) as GPTQ stores them
    for g in range(num_groups):
        members = (g_idx == g).nonzero().flatten()
        w = weight[:, members].double()  # (N, members)
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        if spec.sym:
            scale = torch.maximum(-lo, hi) * 2 / max_code
            zero = torch.full((out_features,), (max_code + 1) // 2, dtype=torch.int64)
        else:
            scale = (hi - lo) / max_code
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().double()  # stored as fp16
        if not spec.sym:
            zero = torch.round(-lo / scale).clamp(0, max_code).long()
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, max_code).long()
        codes[members] = q.t()
        scales[g], zeros[g] = scale.float(), zero
    dequantized = (scales[g_idx].double() * (codes - zeros[g_idx]).double()).t().float()  # (N, K)
    stored_zeros = (zeros - 1) & max_code if spec.checkpoint_format == "gptq" else zeros
    tensors = {
        "qweight": torch.from_numpy(_pack_rows(codes.numpy(), spec.bits)),
        "qzeros": torch.from_numpy(_pack_cols(stored_zeros.numpy(), spec.bits)),
        "scales": scales.half(),
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, dequantized


def make_gptq_checkpoint(folder: Path, hf_config, spec: GPTQSpec, seed: int = 0):
    """Writes a GPTQ checkpoint of a random model of ``hf_config`` into ``folder``; returns the float
    transformers model that holds the dequantized weights (the reference)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    _scale_up(model, seed)
    model.eval()
    generator = torch.Generator().manual_seed(seed + 7)
    orders: dict[str, torch.Tensor] = {}  # projections of one input share GPTQ's act order (one Hessian)
    shared_input = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    state = {}
    conv1d = hf_config.model_type == "gpt2"  # GPT-2's Conv1D keeps (in, out); GPTQ packs it like a Linear
    for name, module in model.named_modules():
        if name.split(".")[-1] not in QUANTIZED_SUFFIXES or name.split(".")[-1] in spec.skip:
            continue
        weight = module.weight.data.t() if conv1d else module.weight.data  # (N, K)
        parent, _, leaf = name.rpartition(".")
        key = f"{parent}.{shared_input.get(leaf, leaf)}"
        order = orders.setdefault(key, torch.randperm(weight.shape[1], generator=generator))
        tensors, dequantized = quantize_gptq_layer(weight, spec, order)
        with torch.no_grad():
            module.weight.copy_(dequantized.t() if conv1d else dequantized)
        state.update({f"{name}.{key}": value for key, value in tensors.items()})
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and f"{module_name}.qweight" in state:
            continue
        if name.startswith("lm_head.") and hf_config.tie_word_embeddings:
            continue
        state[name] = tensor.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config.to_dict()
    quant = {"bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act, "sym": spec.sym,
             "checkpoint_format": spec.checkpoint_format, "lm_head": False}
    if spec.config_file == "config.json":
        config["quantization_config"] = {"quant_method": "gptq", **quant}
    else:
        (folder / spec.config_file).write_text(json.dumps(quant))
    (folder / "config.json").write_text(json.dumps(config))
    train_tokenizer(folder)
    return model


def _unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """(K * bits / 32, N) int32 -> (K, N) codes: the inverse of ``_pack_rows``."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words = words.view(np.uint32)
    codes = np.empty((words.shape[0] * pack, words.shape[1]), dtype=np.int64)
    for j in range(pack):
        codes[j::pack] = (words >> np.uint32(bits * j)) & np.uint32(mask)
    return codes


def read_gptq_layer(state: dict[str, torch.Tensor], prefix: str, bits: int, checkpoint_format: str) -> torch.Tensor:
    """The (N, K) float weight a checkpoint layer encodes, read with this module's own unpacking."""
    codes = _unpack_rows(state[f"{prefix}.qweight"].numpy(), bits)  # (K, N)
    zeros = np.ascontiguousarray(_unpack_rows(np.ascontiguousarray(state[f"{prefix}.qzeros"].numpy().T), bits).T)
    if checkpoint_format == "gptq":
        zeros = (zeros + 1) & ((1 << bits) - 1)
    g_idx = state[f"{prefix}.g_idx"].long().numpy()
    scales = state[f"{prefix}.scales"].float().numpy()
    return torch.from_numpy((scales[g_idx] * (codes - zeros[g_idx])).T.astype(np.float32))


def gptq_test_config(kind: str):
    """The transformers config of a tiny model to quantize: llama, llama_odd, qwen2 or gpt2."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=384, bos_token_id=1, eos_token_id=2)
    if kind == "llama":  # inputs and groups multiples of 32: the packed 4-bit kernel layout
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **common)
    if kind == "llama_odd":  # 48 and 88 inputs: partial last groups, codes one per byte
        return LlamaConfig(hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if kind == "qwen2":  # q/k/v biases stay float beside the quantized weights
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
