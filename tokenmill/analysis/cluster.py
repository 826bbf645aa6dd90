"""The smallest tensor x pipeline layout whose devices each hold their share of a model and its batch.

Tensor parallelism (tp) splits every layer's weights, heads and KV heads over devices (KV heads are
replicated past their number); pipeline parallelism (pp) gives each stage a contiguous range of
layers, the embedding to the first and the head to the last. The fullest device holds
ceil(layers / pp) layers of weights and KV cache, the larger of embedding and head, and the
activations of one layer, all divided by tp.

Traffic per generated token (each device, ring all-reduce): two all-reduces of one hidden vector per
layer, each moving 2 (tp - 1) / tp of it, plus the hidden state and residual crossing each of the
pp - 1 stage boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.analysis.memory import MemoryReport, dtype_bytes
from tokenmill.analysis.model_shape import ModelShape

MAX_TP = 8
"""Tensor parallelism stays inside one machine (8 GPUs on its fast links); pipeline stages span machines."""


@dataclass(frozen=True)
class ClusterPlan:
    tp: int
    pp: int
    per_device_bytes: float
    """What the fullest device holds: its layers' weights and KV cache, embedding or head, activations."""
    device_memory_bytes: float
    allreduce_bytes_per_token: float
    """Bytes each device sends (and receives) in tensor-parallel all-reduces per generated token."""
    pipeline_bytes_per_token: float
    """Bytes crossing stage boundaries per generated token (hidden state and residual)."""

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp


def allreduce_bytes_per_token(shape: ModelShape, tp: int, dtype: str) -> float:
    """Bytes each device sends (and receives) in tensor-parallel all-reduces per generated token: two
    all-reduces of one hidden vector per layer, a ring moving 2 (tp - 1) / tp of it each."""
    hidden = shape.hidden_size * dtype_bytes("fp32" if dtype == "fp32" else "fp16")
    return shape.num_layers * 2 * hidden * 2 * (tp - 1) / tp


def tp_degrees(shape: ModelShape) -> list[int]:
    """Powers of two up to MAX_TP that split the attention heads (and split or replicate the KV heads)."""
    degrees, tp = [], 1
    while tp <= MAX_TP:
        kv_ok = shape.num_kv_heads % tp == 0 or tp % shape.num_kv_heads == 0
        if shape.num_heads % tp == 0 and kv_ok:
            degrees.append(tp)
        tp *= 2
    return degrees


def per_device_bytes(shape: ModelShape, mem: MemoryReport, tp: int, pp: int, bytes_per_param: float) -> float:
    layers = shape.num_layers
    layers_per_stage = -(-layers // pp)
    embedding = shape.vocab_size * shape.hidden_size * bytes_per_param
    head = 0.0 if shape.tie_word_embeddings else embedding
    layer_weights = (mem.weight_bytes - embedding - head) / layers  # incl. the final norm: a rounding error
    ends = embedding + head if pp == 1 else max(embedding, head if head else embedding)
    weights = (layer_weights * layers_per_stage + ends) / tp
    kv = mem.kv_cache_bytes * layers_per_stage / layers / min(tp, shape.num_kv_heads)
    return weights + kv + mem.activation_bytes / tp


def plan_cluster(shape: ModelShape, mem: MemoryReport, device_memory: float, dtype: str) -> ClusterPlan | None:
    """The layout with the fewest devices that holds the configuration (the larger tp first among equals),
    or None when not even MAX_TP x one layer per stage does."""
    act = dtype_bytes("fp32" if dtype == "fp32" else "fp16")
    bytes_per_param = dtype_bytes(dtype) if dtype not in ("int8", "int4") else act  # embeddings stay float
    candidates = sorted(((tp * pp, -tp, tp, pp) for tp in tp_degrees(shape) for pp in range(1, shape.num_layers + 1)))
    for _, _, tp, pp in candidates:
        held = per_device_bytes(shape, mem, tp, pp, bytes_per_param)
        if held <= device_memory:
            hidden = shape.hidden_size * act
            return ClusterPlan(tp, pp, held, device_memory,
                               allreduce_bytes_per_token=allreduce_bytes_per_token(shape, tp, dtype),
                               pipeline_bytes_per_token=(pp - 1) * 2 * hidden)
    return None
