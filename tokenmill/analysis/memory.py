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


QUANTIZED_DTYPES = {"int8": 8, "int4": 4}
INT4_GROUP_SIZE = 64
"""The engine's default int4 group size (``quantization_group_size``)."""


def linear_shapes(shape: ModelShape, expert_layer: bool = False) -> list[tuple[int, int]]:
    """(out, in) of the linear layers the engine quantizes in one layer, merged as it merges them: qkv,
    o, and the dense MLP's gate_up (or the plain MLP's up) and down; in an expert layer the shared
    expert's instead (the router and the experts stay in float)."""
    h, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    i = shape.intermediate_size
    if expert_layer:
        i = shape.shared_expert_intermediate_size
        if not i:
            return [(q + 2 * kv, h), (h, q)]
    return [(q + 2 * kv, h), (h, q), ((2 if shape.gated_mlp else 1) * i, h), (h, i)]


def quantized_matrix_bytes(out_features: int, in_features: int, bits: int, group_size: int,
                           float_bytes: float, panels: bool = False) -> float:
    """What the engine holds for one quantized (out, in) matrix: codes plus a float32 scale and zero
    per group, or the float matrix when its inputs are not a multiple of the group size or packing.
    ``panels``: the device holds 16-bit models' codes in the CPU panel layout where the shape allows
    (outputs a multiple of 16, inputs of 64, groups of 32 or a multiple of 64), with a float16 scale and a
    byte zero per group."""
    group = in_features if group_size == -1 else group_size
    if in_features % group or in_features % (32 // bits):
        return out_features * in_features * float_bytes
    in_panels = (panels and float_bytes == 2 and out_features % 16 == 0 and in_features % 64 == 0
                 and (group == 32 or group % 64 == 0))
    return out_features * in_features * bits / 8 + (3 if in_panels else 8) * out_features * (in_features // group)


def weight_bytes_quantized(shape: ModelShape, dtype: str, act_dtype: str, group_size: int = INT4_GROUP_SIZE,
                           panels: bool = False) -> float:
    """Weight bytes of a model whose linear layers (and LM head) the engine quantized at load:
    ``dtype`` int8 (per channel) or int4 (groups of ``group_size``), the head in int8 groups of 64; embeddings and
    biases in the activation dtype, norm weights in float32, as the engine keeps them. ``panels``: as in
    :func:`quantized_matrix_bytes`."""
    bits, act = QUANTIZED_DTYPES[dtype], dtype_bytes(act_dtype)
    layer_group = -1 if bits == 8 else group_size
    qk_norms = 2 * shape.head_dim if shape.qk_norm else 0
    norm = act if shape.layer_norm else 4  # RMSNorm weights are kept in float32, LayerNorm's in the model dtype
    layers = 0.0
    for expert_layer, count in ((True, shape.num_sparse_layers), (False, shape.num_layers - shape.num_sparse_layers)):
        linears = linear_shapes(shape, expert_layer)
        per_layer = sum(quantized_matrix_bytes(n, k, bits, layer_group, act, panels) for n, k in linears)
        mlp = shape.mlp_params() if expert_layer else shape.dense_mlp_params()
        # Biases, q/k norms, and in expert layers the router, experts and shared-expert gate: all float.
        others = shape.attention_params() + mlp - sum(n * k for n, k in linears)
        per_layer += (others - qk_norms) * act + 4 * qk_norms + norm * 2 * shape.norm_params()
        layers += count * per_layer
    embeddings = (shape.vocab_size + shape.learned_positions) * shape.hidden_size * act
    head_group = 64 if shape.hidden_size % 64 == 0 else -1  # layers/quantization: HEAD_GROUP_SIZE
    head = quantized_matrix_bytes(shape.vocab_size, shape.hidden_size, 8, head_group, act, panels)
    return layers + embeddings + head + norm * shape.norm_params()


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
                  device_memory: float, tp: int, quant_panels: bool = False) -> MemoryReport:
    """``quant_panels``: the device holds quantized codes in the CPU panel layout (``Hardware.quant_panels``)."""
    act_dtype = "fp32" if dtype == "fp32" else "fp16"
    if dtype in QUANTIZED_DTYPES:  # weight-only quantization as the engine does it: codes, scales, float rest
        weights = weight_bytes_quantized(shape, dtype, act_dtype, panels=quant_panels)
    else:
        weights = shape.total_params() * dtype_bytes(dtype)
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
