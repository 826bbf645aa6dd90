"""Memory of weights, KV cache and activations: the seed's simple formulas and exact ones."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.analysis.model_shape import ModelShape

DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def dtype_bytes(dtype: str) -> float:
    from tokenmill.analysis.hardware import AnalysisError

    if dtype not in DTYPE_BYTES:
        raise AnalysisError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def simple_weight_bytes(shape: ModelShape) -> float:
    """The seed's estimate in fp16: layers x (8 h^2 + 4 h h_mlp) bytes (attention 4h^2 + MLP 2h*h_mlp params, 2 bytes each)."""
    h, i = shape.hidden_size, shape.intermediate_size
    return shape.num_layers * (8 * h * h + 4 * h * i)


def simple_kv_bytes(shape: ModelShape, batch: int, input_len: int, output_len: int) -> float:
    """The seed's estimate in fp16: 4 x batch x layers x h x (s_in + s_out) bytes (K and V, 2 bytes each)."""
    return 4 * batch * shape.num_layers * shape.hidden_size * (input_len + output_len)


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> float:
    """K and V of one token in every layer, with grouped-query heads: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes(kv_dtype)


def activation_bytes_per_sequence(shape: ModelShape, input_len: int, act_dtype: str) -> float:
    """Estimated peak activations of one sequence's prefill, one layer at a time: the residual stream,
    q/k/v and MLP intermediates, and an unfused attention score matrix (heads x s_in^2)."""
    width = 4 * shape.hidden_size + (3 if shape.gated_mlp else 2) * shape.intermediate_size
    return dtype_bytes(act_dtype) * input_len * (width + shape.num_heads * input_len)


@dataclass(frozen=True)
class MemoryReport:
    weight_bytes: float
    kv_cache_bytes: float
    activation_bytes: float
    device_memory_bytes: float
    """Memory of all tensor-parallel devices together."""
    max_batch_size: int
    simple_weight_bytes: float
    simple_kv_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_memory_bytes


def memory_report(shape: ModelShape, batch: int, input_len: int, output_len: int, dtype: str, kv_dtype: str,
                  device_memory: float, tp: int) -> MemoryReport:
    weights = shape.total_params() * dtype_bytes(dtype)
    act_dtype = "fp32" if dtype == "fp32" else "fp16"
    per_sequence = (kv_bytes_per_token(shape, kv_dtype) * (input_len + output_len)
                    + activation_bytes_per_sequence(shape, input_len, act_dtype))
    total_memory = device_memory * tp
    max_batch = max(0, int((total_memory - weights) // per_sequence)) if total_memory > weights else 0
    return MemoryReport(
        weight_bytes=weights, kv_cache_bytes=batch * kv_bytes_per_token(shape, kv_dtype) * (input_len + output_len),
        activation_bytes=batch * activation_bytes_per_sequence(shape, input_len, act_dtype),
        device_memory_bytes=total_memory, max_batch_size=max_batch,
        simple_weight_bytes=simple_weight_bytes(shape),
        simple_kv_bytes=simple_kv_bytes(shape, batch, input_len, output_len))
