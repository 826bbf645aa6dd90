"""How a model's linear layers are quantized: chosen at load time (int8, int4) or read from a GPTQ
checkpoint's ``quantization_config``. Pure data, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ModelLoadError

LOAD_TIME_METHODS = ("int8", "int4")
"""Methods that quantize a float checkpoint as it loads (round to nearest)."""
INT4_GROUP_SIZES = (32, 64, 128, -1)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantizationConfig:
    """One quantization scheme for every quantized linear layer of a model."""

    method: str
    """``int8`` / ``int4`` (quantized at load, round to nearest), ``gptq`` (a GPTQ checkpoint) or ``gguf``
    (a GGUF file's Q8_0 / Q4_0 blocks, as stored)."""
    bits: int
    group_size: int
    """Inputs sharing one scale and zero; -1: one group per output channel."""
    sym: bool
    """Symmetric (zero fixed mid-range) or asymmetric (a zero point per group)."""
    desc_act: bool = False
    """GPTQ act-order: the checkpoint's ``g_idx`` maps inputs to groups in a non-monotonic order."""
    checkpoint_format: str = "gptq"
    """``gptq`` (v1: zero points stored minus one) or ``gptq_v2`` (stored as they are)."""
    lm_head: bool = False
    """Whether the LM head is quantized too."""

    @classmethod
    def load_time(cls, method: str, group_size: int | None = None, lm_head: bool = True) -> "QuantizationConfig":
        """``int8``: per output channel, symmetric. ``int4``: groups of ``group_size`` (default 64),
        asymmetric. The LM head, when quantized, is int8 in groups of 64 under both (as llama.cpp
        keeps the output matrix at higher precision), which costs little speed and keeps perplexity
        close."""
        if method == "int8":
            if group_size not in (None, -1):
                raise ValueError(f"int8 quantization is per output channel; quantization_group_size must be unset "
                                 f"or -1, got {group_size}")
            return cls("int8", bits=8, group_size=-1, sym=True, lm_head=lm_head)
        if method == "int4":
            size = 64 if group_size is None else group_size
            if size not in INT4_GROUP_SIZES:
                raise ValueError(f"int4 quantization_group_size {size} is not supported; "
                                 f"choose one of {', '.join(map(str, INT4_GROUP_SIZES))}")
            return cls("int4", bits=4, group_size=size, sym=False, lm_head=lm_head)
        raise ValueError(f"quantization {method!r} is not supported; choose one of {', '.join(LOAD_TIME_METHODS)} "
                         "(GPTQ checkpoints are recognised from their config)")

    @classmethod
    def from_gptq(cls, hf: dict[str, Any], source: str) -> "QuantizationConfig":
        """Parses a GPTQ ``quantization_config`` (or ``quantize_config.json``); ModelLoadError naming
        the field and value for anything we cannot run."""
        method = str(hf.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise ModelLoadError(f"{source}: quant_method {method!r} is not supported; supported: gptq "
                                 "(or load a float checkpoint with quantization='int8' or 'int4')")
        bits = hf.get("bits")
        if bits not in (4, 8):
            raise ModelLoadError(f"{source}: bits = {bits!r} is not supported; supported: 4, 8")
        group_size = hf.get("group_size", -1)
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise ModelLoadError(f"{source}: group_size = {group_size!r} must be a positive integer or -1")
        fmt = str(hf.get("checkpoint_format") or hf.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise ModelLoadError(f"{source}: checkpoint_format = {fmt!r} is not supported; "
                                 f"supported: {', '.join(GPTQ_FORMATS)}")
        if hf.get("dynamic"):
            raise ModelLoadError(f"{source}: per-module 'dynamic' GPTQ settings are not supported")
        return cls("gptq", bits=bits, group_size=group_size, sym=bool(hf.get("sym", True)),
                   desc_act=bool(hf.get("desc_act", False)), checkpoint_format=fmt, lm_head=bool(hf.get("lm_head", False)))

    @classmethod
    def gguf(cls, bits: int, lm_head: bool = True) -> "QuantizationConfig":
        """A GGUF file's Q8_0 (8-bit) or Q4_0 (4-bit) matrices: blocks of 32 inputs, the zero mid-range."""
        return cls("gguf", bits=bits, group_size=32, sym=True, lm_head=lm_head)

    @property
    def lm_head_bits(self) -> int:
        return 8 if self.method == "int4" else self.bits

    def describe(self) -> str:
        group = "per channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"{self.method} ({self.bits}-bit, {group}, {'sym' if self.sym else 'asym'})"
