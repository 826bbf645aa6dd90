"""Sizing the KV cache: parse a memory budget and turn it into a number of blocks."""

from __future__ import annotations

import re

import torch

from tokenmill.config import ModelConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_DEFAULT_CPU_CAP = 4 * 2**30


def parse_memory(value: int | float | str, what: str = "kv_cache_memory") -> int:
    """Bytes from an int (bytes), a float (GiB) or a string such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be bytes (int), GiB (float) or a string like '2GiB', got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        result = int(value * 2**30)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} {value!r} is not a size; use bytes or e.g. '2GiB', '512MiB'")
        result = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if result <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return result


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto",
                       num_kv_heads: int | None = None, num_layers: int | None = None) -> int:
    """K and V for every layer: 2 * layers * kv_heads * (bytes of one head's row); an int8 row is
    head_dim bytes plus a float16 scale. ``num_kv_heads``: the heads one rank holds (tensor parallel);
    ``num_layers``: the layers it holds (pipeline parallel)."""
    from tokenmill.attention.kv_quant import bytes_per_element_row

    element = torch.tensor([], dtype=dtype).element_size()
    row = bytes_per_element_row(config.head_dim, kv_cache_dtype, element)
    return 2 * (num_layers or config.num_hidden_layers) * (num_kv_heads or config.num_key_value_heads) * row


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (MemAvailable on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def default_kv_cache_memory(device: torch.device, max_usable_bytes: int) -> int:
    """What the model can use (``max_usable_bytes``: every sequence of the batch at full context)
    within a budget of 90% of free GPU memory, or on CPU a quarter of available RAM, at most 4 GiB."""
    free = available_memory(device)
    budget = int(free * 0.9) if device.type == "cuda" else min(free // 4, _DEFAULT_CPU_CAP)
    return min(budget, max_usable_bytes)
