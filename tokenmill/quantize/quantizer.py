"""Quantizes a float model's linear layers with GPTQ (calibrated) or round to nearest.

GPTQ runs decoder layer by decoder layer. For layer L, the model (truncated after L) runs the
calibration windows through the engine; hooks collect each linear layer's inputs into its
Hessian; the layer's linears are quantized and their weights replaced by the dequantized values,
so that layer L + 1 sees the activations of an already-quantized model, as GPTQ prescribes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch import nn
from tqdm.auto import tqdm

from tokenmill.layers.linear import Linear, MergedLinear
from tokenmill.logger import get_logger
from tokenmill.quantize.gptq import GPTQResult, HessianAccumulator, gptq_quantize, rtn_result
from tokenmill.sampling_params import SamplingParams

logger = get_logger(__name__)

BUILTIN_CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"
"""~900 words on ten everyday topics, written for this project (not the held-out perplexity text)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """What ``tokenmill quantize`` does."""

    method: str = "gptq"
    """``gptq`` (calibrated, error-compensating) or ``rtn`` (round to nearest)."""
    bits: int = 4
    group_size: int = 128
    """Inputs per scale and zero; -1: per output channel."""
    sym: bool = False
    desc_act: bool = False
    """GPTQ act-order: quantize inputs in order of decreasing Hessian diagonal."""
    damp: float = 0.01
    num_samples: int = 16
    """Calibration windows."""
    seq_len: int = 256
    """Tokens per calibration window."""

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method {self.method!r} is not supported; choose gptq or rtn")
        if self.bits not in (4, 8):
            raise ValueError(f"bits {self.bits} is not supported; choose 4 or 8")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size {self.group_size} must be -1 or a positive multiple of 8")
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ValueError("num_samples must be positive and seq_len at least 2")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (Llama family: ``model.layers``; GPT-2: ``transformer.h``)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer")
    return inner.layers if hasattr(inner, "layers") else inner.h


@contextmanager
def _truncated(layers: nn.ModuleList, count: int) -> Iterator[None]:
    """Runs only the first ``count`` decoder layers (the rest of each pass would be wasted)."""
    kept = list(layers)
    while len(layers) > count:
        del layers[len(layers) - 1]
    try:
        yield
    finally:
        for layer in kept[count:]:
            layers.append(layer)


def _fits(name: str, module: Linear, options: QuantizeOptions) -> bool:
    """Whether GPTQ's format can hold the layer: inputs a multiple of the group size and of the
    packing (``qweight``), each projection's outputs a multiple of the packing (``qzeros``)."""
    pack, in_features = 32 // options.bits, module.in_features
    outputs = module.output_sizes() if isinstance(module, MergedLinear) else [module.out_features]
    reason = None
    if options.group_size != -1 and in_features % options.group_size:
        reason = f"{in_features} inputs are not a multiple of the group size {options.group_size}"
    elif in_features % pack:
        reason = f"{in_features} inputs are not a multiple of the {options.bits}-bit packing ({pack})"
    elif any(rows % pack for rows in outputs):
        reason = f"outputs {outputs} are not multiples of the {options.bits}-bit packing ({pack})"
    if reason:
        logger.warning("%s: %s; left unquantized", name, reason)
    return reason is None


def calibration_windows(token_ids: list[int], options: QuantizeOptions) -> list[list[int]]:
    """Up to ``num_samples`` non-overlapping windows of ``seq_len`` tokens (the last may be shorter)."""
    windows = [token_ids[i:i + options.seq_len] for i in range(0, len(token_ids), options.seq_len)]
    windows = [w for w in windows if len(w) > 1][:options.num_samples]
    if not windows:
        raise ValueError("the calibration text is too short: it gives no window of 2 or more tokens")
    return windows


def quantize_layers(llm, windows: list[list[int]] | None, options: QuantizeOptions) -> dict[str, GPTQResult]:
    """Quantizes every linear layer of ``llm``'s model except the LM head, in place (each weight
    becomes its dequantized value); returns the codes of each quantized layer by module name."""
    model = llm.engine.core.runner.model
    layers = decoder_layers(model)
    results: dict[str, GPTQResult] = {}
    params = SamplingParams(temperature=0.0, max_tokens=1)
    for index in tqdm(range(len(layers)), desc=f"{options.method} {options.bits}-bit", unit="layer"):
        prefix = f"{'model.layers' if hasattr(model, 'model') else 'transformer.h'}.{index}."
        linears = {prefix + name: module for name, module in layers[index].named_modules()
                   if isinstance(module, Linear) and _fits(prefix + name, module, options)}
        hessians = {}
        if options.method == "gptq":
            hooks = []
            for name, module in linears.items():
                hessians[name] = HessianAccumulator(module.in_features)
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, acc=hessians[name]: acc.add(args[0])))
            try:
                with _truncated(layers, index + 1):
                    llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
            finally:
                for hook in hooks:
                    hook.remove()
        for name, module in linears.items():
            weight = module.weight.data
            if options.method == "gptq":
                result = gptq_quantize(weight, hessians[name].hessian, options.bits, options.group_size, options.sym,
                                       options.desc_act, options.damp)
            else:
                result = rtn_result(weight, options.bits, options.group_size, options.sym)
            weight.copy_(result.dequantize().to(weight.dtype))
            results[name] = result
    return results


def quantize_model(model: str, out: str | Path, options: QuantizeOptions, calibration_text: str | None = None,
                   tokenizer: str | None = None) -> Path:
    """Loads ``model`` (a Hugging Face folder, GGUF file or llama2.c checkpoint) in float32,
    quantizes it and writes a GPTQ (v1) checkpoint folder to ``out``; returns ``out``."""
    from dataclasses import replace

    from tokenmill.llm import LLM, engine_config
    from tokenmill.quantize.writer import write_gptq_checkpoint

    # float32: a GGUF file's Q8_0 / Q4_0 matrices load dequantized too (GPTQ starts from the float weights).
    config = engine_config(model, tokenizer=tokenizer, dtype="float32", device="cpu", enable_prefix_caching=False,
                           max_num_seqs=max(1, options.num_samples), max_num_batched_tokens=max(2048, options.seq_len),
                           kv_cache_memory="512MiB")
    llm = LLM.from_engine_config(replace(config, prepack_weights=False))  # GPTQ reads and rewrites plain weights
    if llm.engine.model_config.quantization is not None:
        raise ValueError(f"{model} is quantized already ({llm.engine.model_config.quantization.describe()})")
    windows = None
    if options.method == "gptq":
        if calibration_text is None:
            raise ValueError("GPTQ needs calibration text: pass --calibration TEXTFILE")
        if llm.tokenizer is None:
            raise ValueError("GPTQ calibration needs the model's tokenizer (pass --tokenizer)")
        windows = calibration_windows(llm.tokenizer.encode(calibration_text), options)
        logger.info("calibrating on %d windows, %d tokens", len(windows), sum(map(len, windows)))
    results = quantize_layers(llm, windows, options)
    return write_gptq_checkpoint(llm, results, options, Path(out), source=model)
