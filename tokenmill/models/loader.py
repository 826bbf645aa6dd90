"""Builds a model and fills its parameters from a checkpoint.

Sources of ``(name, tensor)`` pairs: Hugging Face safetensors (single or sharded, memory-mapped),
GGUF files (dequantized, or Q8_0 / Q4_0 matrices as stored), llama2.c ``.bin`` files, or a seeded random
init for named shapes. Every source ends in
``load_weights``, which routes each tensor through its parameter's ``weight_loader`` and
checks that nothing is missing.
"""

from __future__ import annotations

import json
import mmap
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import default_weight_loader
from tokenmill.layers.quantization import QuantizationConfig, apply_quantization
from tokenmill.logger import get_logger
from tokenmill.models.registry import model_class

logger = get_logger(__name__)


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


_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
"""One expert's projection in a checkpoint: ``...mlp.experts.7.gate_proj.weight``."""


def parameter_name(model: nn.Module, ckpt_name: str) -> tuple[str | None, object]:
    """(our parameter name, shard id) of a checkpoint tensor; (None, None) for tensors to skip.

    Merged projections: ``...self_attn.k_proj.weight`` -> (``...self_attn.qkv_proj.weight``, "k")."""
    name = model.checkpoint_name(ckpt_name)
    if name is None:
        return None, None
    expert = _EXPERT_TENSOR.search(name)
    if expert is not None and expert.group(2) in getattr(model, "expert_params", {}):
        param, part = model.expert_params[expert.group(2)]
        return f"{name[:expert.start()]}.experts.{param}", (int(expert.group(1)), part)
    for ckpt_part, (our_part, shard) in getattr(model, "stacked_params", {}).items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{our_part}."), shard
    return name, None


LoadedHook = Callable[[nn.Parameter, object, "str | None", "torch.Tensor | None"], None]
"""Called after each weight lands: (parameter, shard id, checkpoint tensor name or None, that tensor or None)."""


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 on_loaded: LoadedHook | None = None) -> None:
    """Copies checkpoint tensors into ``model``; ModelLoadError on an unknown, misshapen or missing one
    (parameters marked ``optional`` may be missing: they keep their initial value)."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    for ckpt_name, tensor in weights:
        name, shard_id = parameter_name(model, ckpt_name)
        if name is None:
            continue
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
        if on_loaded is not None:
            on_loaded(param, shard_id, ckpt_name, tensor)
    missing = [f"{name}[{shard}]" if shard is not None else name
               for name, param in params.items()
               for shard in getattr(param, "shard_ids", (None,))
               if (name, shard) not in loaded and not getattr(param, "optional", False)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weight(s) the model needs: {shown}")


def _safetensors_files(model_dir: Path) -> list[Path]:
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
    return files


def safetensors_names(model_dir: Path) -> list[str]:
    """The names of every tensor in a folder's safetensors files (headers only, no data read)."""
    names = []
    for file in _safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
        except SafetensorError as e:
            raise ModelLoadError(f"{file}: cannot read safetensors file ({e}); is it truncated?") from None
    return names


def safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields every tensor of a folder's ``model.safetensors`` or sharded ``*.safetensors`` files."""
    for file in _safetensors_files(model_dir):
        if not file.is_file():
            raise ModelLoadError(f"{file}: weight file named in the index is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise ModelLoadError(f"{file}: cannot read safetensors file ({e}); is it truncated?") from None


def random_weights(model: nn.Module, seed: int, std: float = 0.02, on_loaded: LoadedHook | None = None) -> None:
    """Seeded random init for named shapes and the demo: N(0, std) matrices, unit norms, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                # In slices of rows (a multiple of 16 values each: the same numbers as one call), so that a
                # large table never has a float32 copy of itself beside it.
                rows = 16 * max(1, 2**20 // (16 * param[0].numel()))
                for start in range(0, param.shape[0], rows):
                    part = param[start:start + rows]
                    part.copy_(torch.randn(part.shape, generator=generator).mul_(std))
            if on_loaded is not None:
                for shard in getattr(param, "shard_ids", (None,)):
                    on_loaded(param, shard, None, None)


def safetensors_tensor_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it (headers only)."""
    files = {}
    for file in _safetensors_files(Path(model_dir)):
        with safe_open(str(file), framework="pt") as f:
            files.update((name, file) for name in f.keys())
    return files


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def map_checkpoint_tensor(file: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of safetensors ``file`` mapped from the file, not read: its pages load when touched
    and the system may drop them again (a private, copy-on-write mapping that is never written)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_len))[name]
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    begin, end = entry["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
    return torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + header_len + begin).view(entry["shape"])


def load_model(model: str, dtype: str, device: torch.device, seed: int = 0,
               quantization: str | None = None, load_time_quantization: QuantizationConfig | None = None,
               prepack: bool = True, quantize_lm_head: bool = True) -> tuple[nn.Module, ModelConfig]:
    """Loads a Hugging Face folder (float or GPTQ), a GGUF file, a llama2.c ``.bin`` checkpoint or a
    named random shape; ``load_time_quantization`` (int8, int4) rounds a float checkpoint's linear
    layers as they load. ``quantization`` is what the user asked for (checked against the checkpoint;
    a GGUF file's Q8_0 / Q4_0 matrices run as stored in 16-bit runs or with ``gguf``, ``none`` dequantizes them).

    ``dtype="auto"`` keeps the checkpoint's dtype, except float16 on CPU, which runs as float32.
    """
    module, config, weights, _ = open_model(model, dtype, device, quantization, load_time_quantization,
                                            quantize_lm_head=quantize_lm_head)
    fill_weights(module, weights, seed)
    process_weights_after_loading(module, prepack)
    return module, config


def open_model(model: str, dtype: str, device: torch.device, quantization: str | None = None,
               load_time_quantization: QuantizationConfig | None = None, build_device: torch.device | None = None,
               quantize_lm_head: bool = True
               ) -> tuple[nn.Module, ModelConfig, Iterable[tuple[str, torch.Tensor]] | None, Path]:
    """``load_model``'s first half: (the model built with uninitialised weights and its quantized layers
    assigned, its config, the checkpoint's tensors to load (None: a named random shape), the path).
    ``build_device``: where to build it when not on ``device`` (the CPU, for a model that moves to the
    GPU unit by unit)."""
    from tokenmill.config import parse_dtype
    from tokenmill.models.gguf import gguf_weights, is_gguf_file, open_gguf, reader_config
    from tokenmill.models.llama2c import is_llama2c_checkpoint, read_llama2c
    from tokenmill.models.shapes import SHAPES

    path = Path(model)
    if model in SHAPES and not path.exists():
        config, weights = SHAPES[model], None
    elif is_gguf_file(path):
        reader = open_gguf(path)
        config, weights = reader_config(reader, path), None  # the weights once the layers' methods are known
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
    module = build_model(config, torch_dtype, build_device or device)
    if is_gguf_file(path):
        # By default the blocks run as stored for 16-bit activations; float32 runs dequantize them, as float32
        # panels multiply faster than the exact float32 product over blocks of 32 inputs.
        keep = quantization == "gguf" or (quantization is None and torch_dtype in (torch.bfloat16, torch.float16))
        native = _gguf_native_layers(module, reader, config, keep, quantize_lm_head, required=quantization == "gguf")
        weights = gguf_weights(reader, config, path, native)
    _quantize_layers(module, config, path, quantization, load_time_quantization)
    return module, config, weights, path


def fill_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]] | None, seed: int,
                 on_loaded: LoadedHook | None = None) -> None:
    """The checkpoint's tensors into ``module``, or seeded random ones for a named shape (``weights`` None)."""
    if weights is None:
        random_weights(module, seed, on_loaded=on_loaded)
    else:
        load_weights(module, weights, on_loaded)


def _gguf_native_layers(module: nn.Module, reader, config: ModelConfig, keep: bool, lm_head: bool,
                        required: bool = False) -> frozenset[str]:
    """With ``keep``, gives the GGUF linear method to each linear layer whose matrices are all Q8_0, or all
    Q4_0 (a merged q/k/v or gate/up whose parts differ stays float, and so does a head split over
    tensor-parallel ranks); returns the checkpoint names of those matrices, which then load as codes and
    scales. Without it (``none``, ``int8``, ``int4``, or a float32 run) everything loads dequantized.
    ``required`` (``quantization="gguf"``): ModelLoadError if no layer can keep its blocks."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.quantization.methods import GGUFLinearMethod
    from tokenmill.models.gguf import matrix_bits, tensor_codes

    if not keep:
        return frozenset()
    linears = {name for name, m in module.named_modules() if isinstance(m, Linear) and GGUFLinearMethod.holds(m)}
    parts: dict[str, dict[str, int | None]] = {}  # layer -> {checkpoint name: bits, None for other types}
    stored = matrix_bits(reader, config)
    for ckpt, bits in stored.items():
        param = parameter_name(module, ckpt)[0]
        layer = None if param is None else param.removesuffix(".weight")
        if layer in linears and (lm_head or layer.split(".")[-1] != "lm_head"):
            parts.setdefault(layer, {})[ckpt] = bits
    native: set[str] = set()
    tied_bits = stored.get("model.embed_tokens.weight")
    tied_head = bool(config.tie_word_embeddings and lm_head and tied_bits and "lm_head" in linears
                     and "lm_head" not in parts)
    if tied_head:
        # The head is the embedding matrix: it takes that matrix's blocks (the embedding loads dequantized).
        head = GGUFLinearMethod(tied_bits, "lm_head", tensor_codes(reader, "token_embd.weight"))
        module.get_submodule("lm_head").set_quant_method(head)
        logger.info("GGUF: the tied LM head runs as stored in the embedding's %d-bit blocks", tied_bits)
    for bits, kind in ((8, "Q8_0"), (4, "Q4_0")):
        layers = {layer for layer, found in parts.items() if set(found.values()) == {bits}}
        count = apply_quantization(module, QuantizationConfig.gguf(bits), lambda name: name in layers)
        if count:
            logger.info("GGUF: %d linear layers run as stored in %s blocks (%d-bit codes, groups of 32)",
                        count, kind, bits)
        native.update(ckpt for layer in layers for ckpt in parts[layer])
    if required and not native and not tied_head:
        raise ModelLoadError(f"quantization='gguf' needs Q8_0 or Q4_0 matrices in a Llama-family GGUF file; "
                             f"{config.architecture} here has none")
    return frozenset(native)


def _quantize_layers(module: nn.Module, config: ModelConfig, path: Path, requested: str | None,
                     load_time: QuantizationConfig | None) -> None:
    """Assigns quantized linear methods before loading: a GPTQ checkpoint's to the layers it holds
    ``qweight`` for, or a load-time scheme to every linear layer (GGUF files: ``_gguf_native_layers``)."""
    from tokenmill.models.gguf import is_gguf_file

    checkpoint = config.quantization
    if checkpoint is not None:
        if requested not in (None, checkpoint.method):
            raise ModelLoadError(f"{path} is a {checkpoint.method} checkpoint already; it cannot be loaded with "
                                 f"quantization={requested!r} (leave it unset)")
        ours = (parameter_name(module, name)[0] for name in safetensors_names(path) if name.endswith(".qweight"))
        quantized = {name.removesuffix(".qweight") for name in ours if name is not None}  # None: another stage's
        apply_quantization(module, checkpoint, lambda name: name in quantized)
        logger.info("GPTQ checkpoint: %d linear layers quantized, %s", len(quantized), checkpoint.describe())
    elif requested == "gptq":
        raise ModelLoadError(f"quantization='gptq' needs a GPTQ checkpoint; {path} has no quantization_config")
    elif requested == "gguf" and not is_gguf_file(path):
        raise ModelLoadError(f"quantization='gguf' needs a GGUF file; {path} is not one")
    elif load_time is not None:
        count = apply_quantization(module, load_time)
        logger.info("quantizing %d linear layers to %s at load", count, load_time.describe())


def process_module(module: nn.Module, prepack: bool = True) -> None:
    """Lets one layer convert its loaded weights into its runtime layout (prepacked, quantized);
    ``prepack=False`` leaves float linear weights as they are."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.quantization import UnquantizedLinearMethod

    hook = getattr(module, "process_weights_after_loading", None)
    if hook is None:
        return
    if not prepack and isinstance(module, Linear) and type(module.quant_method) is UnquantizedLinearMethod:
        return
    hook()


def process_weights_after_loading(model: nn.Module, prepack: bool = True, skip: set[int] = frozenset()) -> None:
    """``process_module`` on every layer of ``model`` but those whose ids are in ``skip`` (done already)."""
    for module in list(model.modules()):  # a list: quantizing adds submodules
        if module is not model and id(module) not in skip:
            process_module(module, prepack)


def decode_read_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step must read: every linear layer (the LM head included) and every
    norm, but not the embedding tables, of which a step reads one row; offloaded units whole, since
    each step brings them back (an offloaded embedding too)."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.norm import LayerNorm, RMSNorm

    streamer = getattr(model, "weight_streamer", None)
    total = 0 if streamer is None else streamer.stats.offloaded_bytes  # the units' own tensors are empty now
    for module in model.modules():
        if isinstance(module, Linear):
            total += module.read_bytes()
        elif isinstance(module, (RMSNorm, LayerNorm)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights as the model holds them at run time (prepacked and quantized ones
    included, shared ones once; offloaded ones where they are offloaded)."""
    from tokenmill.layers.quantization.quantized_matrix import QuantizedMatrix

    streamer = getattr(model, "weight_streamer", None)
    total = 0 if streamer is None else streamer.stats.offloaded_bytes  # (a mapped embedding is a parameter)
    total += sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            total += packed.numel() * packed.element_size()
        if isinstance(module, QuantizedMatrix):
            total += module.nbytes() + (0 if module.perm is None else module.perm.numel() * 8)
    return total
