"""Builds a model and fills its parameters from a checkpoint.

Sources of ``(name, tensor)`` pairs: Hugging Face safetensors (single or sharded, memory-mapped),
GGUF files (dequantized), llama2.c ``.bin`` files, or a seeded random init for named shapes. Every source ends in
``load_weights``, which routes each tensor through its parameter's ``weight_loader`` and
checks that nothing is missing.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import default_weight_loader
from tokenmill.models.registry import model_class


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An uninitialised model of ``config``'s architecture, its parameters in ``dtype`` on ``device``."""
    with _default_dtype(dtype), torch.device(device):
        return model_class(config.architecture)(config).eval()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies checkpoint tensors into ``model``; ModelLoadError on an unknown, misshapen or missing one."""
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", {})
    loaded: set[tuple[str, object]] = set()
    for ckpt_name, tensor in weights:
        name = model.checkpoint_name(ckpt_name)
        if name is None:
            continue
        shard_id = None
        for ckpt_part, (our_part, shard) in stacked.items():
            if f".{ckpt_part}." in name:
                name, shard_id = name.replace(f".{ckpt_part}.", f".{our_part}."), shard
                break
        param = params.get(name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {ckpt_name!r} has no place in {type(model).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                loader(param, tensor, shard_id)
        except ModelLoadError as e:
            raise ModelLoadError(f"checkpoint tensor {ckpt_name!r}: {e}") from None
        loaded.add((name, shard_id))
    missing = [f"{name}[{shard}]" if shard is not None else name
               for name, param in params.items()
               for shard in getattr(param, "shard_ids", (None,)) if (name, shard) not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weight(s) the model needs: {shown}")


def safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every tensor of a folder's ``model.safetensors`` or sharded ``*.safetensors`` files."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weight files found")
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"{file}: weight file named in the index is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"{file}: cannot read safetensors file ({e}); is it truncated?") from None


def random_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random init for named shapes and the demo: N(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def load_model(model: str, dtype: str, device: torch.device, seed: int = 0) -> tuple[nn.Module, ModelConfig]:
    """Loads a Hugging Face folder, a llama2.c ``.bin`` checkpoint or a named random shape.

    ``dtype="auto"`` keeps the checkpoint's dtype, except float16 on CPU, which runs as float32.
    """
    from tokenmill.config import parse_dtype
    from tokenmill.models.gguf import is_gguf_file, read_gguf
    from tokenmill.models.llama2c import is_llama2c_checkpoint, read_llama2c
    from tokenmill.models.shapes import SHAPES

    path = Path(model)
    if model in SHAPES and not path.exists():
        config, weights = SHAPES[model], None
    elif is_gguf_file(path):
        config, weights = read_gguf(path)
    elif is_llama2c_checkpoint(path):
        config, weights = read_llama2c(path)
    elif path.is_dir():
        config, weights = ModelConfig.from_pretrained(path), safetensors_weights(path)
    elif path.exists():
        raise ModelLoadError(f"{model}: expected a Hugging Face model folder, a GGUF file or a llama2.c .bin checkpoint")
    else:
        raise ModelLoadError(f"model {model!r} not found: not a folder, a .gguf or .bin file or a named shape "
                             f"({', '.join(SHAPES)})")
    if dtype == "auto":
        torch_dtype = parse_dtype(config.torch_dtype)
        if torch_dtype == torch.float16 and device.type == "cpu":
            torch_dtype = torch.float32
    else:
        torch_dtype = parse_dtype(dtype)
    module = build_model(config, torch_dtype, device)
    if weights is None:
        random_weights(module, seed)
    else:
        load_weights(module, weights)
    process_weights_after_loading(module)
    return module, config


def process_weights_after_loading(model: nn.Module) -> None:
    """Lets each layer convert its loaded weights into its runtime layout (e.g. prepacked bf16)."""
    for module in model.modules():
        hook = getattr(module, "process_weights_after_loading", None)
        if hook is not None and module is not model:
            hook()


def decode_read_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step must read: every linear layer (the LM head included) and every
    norm, but not the embedding tables, of which a step reads one row."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.norm import LayerNorm, RMSNorm

    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            weight = module.packed_weight if module.packed_weight is not None else module.weight
            total += weight.numel() * weight.element_size()
            if module.bias is not None:
                total += module.bias.numel() * module.bias.element_size()
        elif isinstance(module, (RMSNorm, LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights as the model holds them at run time (prepacked ones included, shared ones once)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            total += packed.numel() * packed.element_size()
    return total
