"""Roofline per operator: FLOPs, bytes moved, arithmetic intensity, bound and roofline time.

One decoder layer is a list of operators; a phase (prefill of the prompt, or one decode step)
runs them over ``num_tokens`` new tokens attending to ``context_len`` positions. Each operator's
time is ``max(FLOPs / peak, bytes / bandwidth)``: compute-bound when its intensity exceeds the
hardware's ridge point (ops:byte), memory-bound otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.analysis.hardware import Hardware
from tokenmill.analysis.memory import dtype_bytes
from tokenmill.analysis.model_shape import ModelShape


@dataclass(frozen=True)
class Op:
    name: str
    kind: str
    """``linear``, ``attention`` (matrix products over the KV cache) or ``elementwise``."""
    flops: float
    bytes: float
    count: int
    """How many times the phase runs it (layers, or 1 for the LM head)."""
    time_s: float
    bound: str

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


@dataclass(frozen=True)
class Phase:
    name: str
    batch_size: int
    num_tokens: int
    context_len: int
    ops: list[Op]

    @property
    def time_s(self) -> float:
        return sum(op.time_s * op.count for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.flops * op.count for op in self.ops)

    @property
    def bytes(self) -> float:
        return sum(op.bytes * op.count for op in self.ops)


def phase_ops(shape: ModelShape, hw: Hardware, batch: int, query_len: int, context_len: int, dtype: str,
              kv_dtype: str, tp: int, name: str) -> Phase:
    """Operators of one phase on one of ``tp`` tensor-parallel devices (communication not modelled)."""
    wb, kvb = dtype_bytes(dtype), dtype_bytes(kv_dtype)
    compute = "fp32" if dtype == "fp32" else ("int8" if dtype == "int8" else "fp16")
    ab = 4.0 if dtype == "fp32" else 2.0  # activations: weight-only int8/int4 compute in fp16
    peak, bw = hw.flops(compute) / 1.0, hw.bandwidth
    tokens = batch * query_len
    h, d, i = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q_out, kv_out = shape.num_heads * d // tp, shape.num_kv_heads * d // tp
    heads = shape.num_heads // tp
    ops: list[Op] = []

    def add(op_name, kind, flops, nbytes, count):
        time = max(flops / peak, nbytes / bw)
        bound = "compute" if flops / peak > nbytes / bw else "memory"
        ops.append(Op(op_name, kind, flops, nbytes, count, time, bound))

    def linear(op_name, rows, n_in, n_out, count=shape.num_layers, weight_rows=None):
        flops = 2 * rows * n_in * n_out
        nbytes = (weight_rows or n_out) * n_in * wb + rows * n_in * ab + rows * n_out * ab
        add(op_name, "linear", flops, nbytes, count)

    def elementwise(op_name, elements, flops_per_element, reads, count=shape.num_layers):
        add(op_name, "elementwise", elements * flops_per_element, elements * (reads + 1) * ab, count)

    elementwise("input_norm", tokens * h, 4, 1)
    linear("q_proj", tokens, h, q_out)
    linear("k_proj", tokens, h, kv_out)
    linear("v_proj", tokens, h, kv_out)
    elementwise("rotary", tokens * (q_out + kv_out), 3, 1)
    kv_read = batch * context_len * kv_out * kvb
    scores = batch * heads * query_len * context_len
    add("qk_matmul", "attention", 2 * scores * d, tokens * q_out * ab + kv_read + scores * ab, shape.num_layers)
    elementwise("softmax", scores, 5, 1)
    add("sv_matmul", "attention", 2 * scores * d, scores * ab + kv_read + tokens * q_out * ab, shape.num_layers)
    linear("o_proj", tokens, q_out, h)
    elementwise("attn_residual_add", tokens * h, 1, 2)
    elementwise("post_attention_norm", tokens * h, 4, 1)
    i_local = i // tp
    sparse, dense = shape.num_sparse_layers, shape.num_layers - shape.num_sparse_layers
    if sparse:
        routed = tokens * shape.experts_per_token
        e_local = (shape.expert_intermediate_size or i) // tp
        # Distinct experts whose weights a step reads: all of them once enough tokens are routed.
        experts_read = shape.num_experts * (1 - (1 - shape.experts_per_token / shape.num_experts) ** tokens)
        linear("router", tokens, h, shape.num_experts, count=sparse)
        for part, (n_in, n_out) in (("gate_proj", (h, e_local)), ("up_proj", (h, e_local)), ("down_proj", (e_local, h))):
            flops = 2 * routed * n_in * n_out
            nbytes = experts_read * n_in * n_out * wb + routed * (n_in + n_out) * ab
            add(f"experts.{part}", "linear", flops, nbytes, sparse)
        elementwise("silu_and_mul", routed * e_local, 5, 2, count=sparse)
        if shape.shared_expert_intermediate_size:
            s_local = shape.shared_expert_intermediate_size // tp
            linear("shared_expert.gate_up", tokens, h, 2 * s_local, count=sparse)
            linear("shared_expert.down", tokens, s_local, h, count=sparse)
            linear("shared_expert_gate", tokens, h, 1, count=sparse)
    if dense and shape.gated_mlp:
        linear("gate_proj", tokens, h, i_local, count=dense)
        linear("up_proj", tokens, h, i_local, count=dense)
        elementwise("silu_and_mul", tokens * i_local, 5, 2, count=dense)
        linear("down_proj", tokens, i_local, h, count=dense)
    elif dense:
        linear("fc1", tokens, h, i_local)
        elementwise("activation", tokens * i_local, 8, 1)
        linear("fc2", tokens, i_local, h)
    elementwise("mlp_residual_add", tokens * h, 1, 2)
    elementwise("final_norm", batch * h, 4, 1, count=1)
    linear("lm_head", batch, h, shape.vocab_size // tp, count=1)  # logits of each sequence's last token
    return Phase(name, batch, tokens, context_len, ops)
