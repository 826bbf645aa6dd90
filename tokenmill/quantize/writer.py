"""Writes a quantized model as a standard GPTQ checkpoint folder (v1 format, as AutoGPTQ writes it).

- ``model.safetensors``: per quantized projection ``qweight`` (K / pack, N) int32, ``qzeros``
  (G, N / pack) int32 holding zero - 1, ``scales`` (G, N) float16 and ``g_idx`` (K,) int32; every
  other tensor in float16 under its Hugging Face name (merged projections split back into
  q/k/v and gate/up, GPT-2's Conv1D weights transposed back to (in, out)).
- ``config.json`` with ``quantization_config`` (the source's, or one written from the model's
  config for GGUF and llama2.c sources), and the tokenizer where the source has one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.layers.linear import MergedLinear
from tokenmill.layers.quantization.packing import pack_int32
from tokenmill.quantize.gptq import GPTQResult

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3", "GPT2LMHeadModel": "gpt2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def gptq_tensors(result: GPTQResult, bits: int) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors (v1: zero points stored minus one, modulo 2**bits)."""
    stored_zeros = (result.zeros - 1) & (2**bits - 1)
    return {"qweight": pack_int32(result.codes.t().contiguous(), bits, dim=0),
            "qzeros": pack_int32(stored_zeros, bits, dim=1),
            "scales": result.scales.half().contiguous(),
            "g_idx": result.g_idx.to(torch.int32).clone()}  # a copy per shard: merged shards share it


def _split_rows(result: GPTQResult, start: int, rows: int) -> GPTQResult:
    return GPTQResult(result.codes[start:start + rows], result.scales[:, start:start + rows],
                      result.zeros[:, start:start + rows], result.g_idx)


def checkpoint_tensors(model: torch.nn.Module, results: dict[str, GPTQResult], bits: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its Hugging Face name."""
    from tokenmill.models.gpt2 import Conv1D

    shard_names = {(ours, shard): theirs for theirs, (ours, shard) in getattr(model, "stacked_params", {}).items()}
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        if module_name in results and leaf == "weight":
            result = results[module_name]
            if isinstance(module, MergedLinear):  # one checkpoint layer per shard, e.g. q_proj, k_proj, v_proj
                parent, _, ours = module_name.rpartition(".")
                for shard, (start, rows) in module.offsets.items():
                    prefix = f"{parent}.{shard_names[(ours, shard)]}"
                    state.update({f"{prefix}.{k}": v for k, v in gptq_tensors(_split_rows(result, start, rows),
                                                                             bits).items()})
            else:
                state.update({f"{module_name}.{k}": v for k, v in gptq_tensors(result, bits).items()})
            continue
        tensor = param.detach().to(torch.float16)
        if isinstance(module, Conv1D) and leaf == "weight":
            tensor = tensor.t()
        if isinstance(module, MergedLinear):
            parent, _, ours = module_name.rpartition(".")
            for shard, (start, rows) in module.offsets.items():
                state[f"{parent}.{shard_names[(ours, shard)]}.{leaf}"] = tensor.narrow(0, start, rows).contiguous()
            continue
        state[name] = tensor.contiguous()
    return state


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` for a model that came without one (GGUF, llama2.c)."""
    common = {"architectures": [config.architecture], "model_type": _MODEL_TYPES[config.architecture],
              "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
              "bos_token_id": config.bos_token_id, "torch_dtype": "float16",
              "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0]}
    if config.architecture == "GPT2LMHeadModel":
        return {**common, "n_embd": config.hidden_size, "n_layer": config.num_hidden_layers,
                "n_head": config.num_attention_heads, "n_positions": config.max_position_embeddings,
                "n_inner": config.intermediate_size, "layer_norm_epsilon": config.norm_eps,
                "activation_function": config.hidden_act}
    scaling = config.rope_scaling
    return {**common, "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "hidden_act": config.hidden_act, "mlp_bias": config.mlp_bias,
            "attention_bias": config.qkv_bias and config.architecture != "Qwen2ForCausalLM",
            "rope_scaling": None if scaling is None else {
                "rope_type": scaling.rope_type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings}}


def write_gptq_checkpoint(llm, results: dict[str, GPTQResult], options, out: Path, source: str) -> Path:
    """Writes the folder; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    model = llm.engine.core.runner.model
    save_file(checkpoint_tensors(model, results, options.bits), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    source_path = Path(source)
    config = json.loads((source_path / "config.json").read_text()) if source_path.is_dir() else \
        hf_config(llm.engine.model_config)
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": options.bits, "group_size": options.group_size, "desc_act": options.desc_act,
        "sym": options.sym, "damp_percent": options.damp, "checkpoint_format": "gptq", "lm_head": False,
        "true_sequential": False, "quantizer": [f"tokenmill {options.method}"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(llm, source_path, out)
    return out


def _write_tokenizer(llm, source: Path, out: Path) -> None:
    """Copies a folder's tokenizer files, or writes a GGUF file's tokenizer as tokenizer.json; a
    llama2.c tokenizer stays where it is (pass it with --tokenizer, as for the source)."""
    from tokenmill.engine.gguf_tokenizer import GGUFTokenizer

    if source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
    elif isinstance(llm.tokenizer, GGUFTokenizer):
        llm.tokenizer._tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": llm.tokenizer.bos_token, "eos_token": llm.tokenizer.eos_token,
             "chat_template": llm.tokenizer.chat_template}))
