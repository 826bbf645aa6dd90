"""Quantized linear layers: a registry of linear methods and the step that assigns them to a model.

``apply_quantization(model, config)`` runs after the model is built and before it loads: each
linear layer gets the method its config names, by the layer's name (the LM head only when the
config says so). The layer then loads and multiplies in that form; model files do not change.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from tokenmill.layers.quantization.config import QuantizationConfig
from tokenmill.layers.quantization.methods import (GGUFLinearMethod, GPTQLinearMethod, RTNLinearMethod,
                                                    UnquantizedLinearMethod)



HEAD_GROUP_SIZE = 64
"""The LM head's int8 groups: on SmolLM2 they keep perplexity within 0.7% of float32, where one
scale per output channel (+1.0%) does not."""


def _round_to_nearest(cfg: QuantizationConfig, name: str, bits: int, in_features: int) -> RTNLinearMethod:
    """int8 layers per channel and symmetric, the LM head in int8 groups of 64 (per channel when its
    inputs are not a multiple of 64); int4 layers in the config's groups, asymmetric."""
    if name.split(".")[-1] == "lm_head":
        return RTNLinearMethod(8, HEAD_GROUP_SIZE if in_features % HEAD_GROUP_SIZE == 0 else -1, True, name)
    return RTNLinearMethod(bits, -1 if bits == 8 else cfg.group_size, bits == 8, name)


_METHODS: dict[str, Callable[[QuantizationConfig, str, int, int], object]] = {
    "int8": _round_to_nearest,
    "int4": _round_to_nearest,
    "gptq": lambda cfg, name, bits, in_features: GPTQLinearMethod(cfg, name),
    "gguf": lambda cfg, name, bits, in_features: GGUFLinearMethod(bits, name),
}


def supported_methods() -> list[str]:
    return list(_METHODS)


def apply_quantization(model: nn.Module, config: QuantizationConfig,
                       is_quantized: Callable[[str], bool] | None = None) -> int:
    """Gives every linear layer of ``model`` the method of ``config``; returns how many layers got it.

    ``is_quantized(name)`` may exclude layers (a GPTQ checkpoint says which it quantized by holding
    their ``qweight``); the LM head is included only when ``config.lm_head`` is set.
    """
    from tokenmill.layers.linear import Linear

    if config.method not in _METHODS:
        raise ValueError(f"quantization method {config.method!r} is not supported; "
                         f"supported: {', '.join(supported_methods())}")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        is_head = name.split(".")[-1] == "lm_head"
        if (is_head and not config.lm_head) or (is_quantized is not None and not is_quantized(name)):
            continue
        bits = config.lm_head_bits if is_head else config.bits
        module.set_quant_method(_METHODS[config.method](config, name, bits, module.in_features))
        count += 1
    return count


__all__ = ["QuantizationConfig", "UnquantizedLinearMethod", "apply_quantization", "supported_methods"]
