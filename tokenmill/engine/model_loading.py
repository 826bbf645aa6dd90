"""``load_for_engine``: the model an engine (or one rank of it) runs, loaded with its weight offload."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.models.loader import load_model
from tokenmill.models.weight_arena import gather_weights
from tokenmill.offload.streamed_load import load_within_budget
from tokenmill.offload.weights import apply_weight_offload


def load_for_engine(config: EngineConfig, device: torch.device) -> tuple[nn.Module, ModelConfig]:
    """``load_model`` with an EngineConfig's options, then its weight offload (``offload/weights.py``);
    every rank loads its own part this way (inside ``building_for``). Offloaded weights are offloaded as
    they load (``offload/streamed_load.py``): the whole model is never in memory, nor on the GPU. On CPU,
    the weights a step streams are then gathered onto huge pages (``models/weight_arena.py``)."""
    if config.offload_folder is not None or (config.cpu_offload_gb and device.type == "cuda"):
        return load_within_budget(config, device)
    model, model_config = load_model(config.model, config.dtype, device, seed=config.seed,
                                     quantization=config.quantization,
                                     load_time_quantization=config.load_time_quantization(),
                                     prepack=config.prepack_weights, quantize_lm_head=config.quantize_lm_head)
    apply_weight_offload(model, config, device)
    if device.type == "cpu" and getattr(model, "weight_streamer", None) is None:
        gather_weights(model)  # one huge-page region for what every decode step streams
    return model, model_config
