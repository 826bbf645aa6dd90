"""Architecture name -> model class, imported lazily."""

from __future__ import annotations

import importlib
from typing import Any

from tokenmill.errors import ModelLoadError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2MoeForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "GPT2LMHeadModel": ("tokenmill.models.gpt2", "GPT2LMHeadModel"),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "mixtral": "MixtralForCausalLM",
                "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(hf_config: dict[str, Any]) -> str:
    """The supported architecture a Hugging Face config names; ModelLoadError listing the supported ones."""
    names = list(hf_config.get("architectures") or [])
    if not names and hf_config.get("model_type") in _MODEL_TYPES:
        names = [_MODEL_TYPES[hf_config["model_type"]]]
    for name in names:
        if name in _MODELS:
            return name
    found = ", ".join(names) or f"model_type {hf_config.get('model_type')!r}"
    raise ModelLoadError(f"architecture {found} is not supported; supported: {', '.join(supported_architectures())}")


def model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}")
    module, cls = _MODELS[architecture]
    return getattr(importlib.import_module(module), cls)
