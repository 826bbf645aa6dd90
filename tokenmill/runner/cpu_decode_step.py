"""CpuDecodeStep: a Llama-family decode step as one C++ call (``kernels/csrc/decode_step.cpp``).

On a CPU at batch 1, the Python forward of a small model spends milliseconds per step on
dispatch: SmolLM2-135M makes ~300 calls per step (norms, projections, rotary, cache writes,
attention, activation), each ~5-10 us of module calls, argument checks and tensor wrapping,
beside ~5-10 ms of streaming its weights. The C++ step calls the same kernels in the same order
and dtypes, so its hidden states are bit-identical to the Python forward's; only the interpreter
leaves the loop. Like CUDA graphs on a GPU, it serves decode-only steps and leaves prompt chunks
to the Python forward.

It is built when every piece has a C++ twin: a Llama-family model without q/k norms on CPU, the
``cpu`` attention backend, a float or int8 KV cache, and linear layers held dense, oneDNN-prepacked
or quantized without an input permutation. ``TOKENMILL_NO_CPU_DECODE_STEP=1`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.kv_quant import Int8KVCache
from tokenmill.kernels import cpu_kernels
from tokenmill.kernels.triton_ops import triton_ops
from tokenmill.logger import get_logger

logger = get_logger(__name__)


class CpuDecodeStep:
    """``step(input_ids (M,), positions (M,), metadata) -> (hidden (M, H), logits (M, V) or None, greedy
    tokens (M,) or None)`` for decode-only steps: token ids in, every row's logits and greedy token out
    (None where the model's own ``compute_logits`` must run)."""

    def __init__(self, step, has_head: bool):
        self._step = step
        self.runs_steps = has_head  # forward_steps feeds each step's greedy tokens (from the head) to the next

    @classmethod
    def build(cls, model: nn.Module, backend_name: str, kv_caches: list) -> CpuDecodeStep | None:
        """The C++ step for ``model`` and its bound caches, or None (with the reason logged) where
        some piece has no C++ twin; the Python forward then runs every step."""
        reason = _unsupported(model, backend_name)
        kernels = cpu_kernels()
        if reason is None and kernels is None:
            reason = "the C++ CPU kernels are not built"
        layers = []
        if reason is None:
            for index, (layer, cache) in enumerate(zip(model.model.layers, kv_caches)):
                built = _layer(kernels, layer, cache, model.model.embed_tokens.weight.dtype)
                if isinstance(built, str):
                    reason = f"layer {index}: {built}"
                    break
                layers.append(built)
        if reason is not None:
            logger.debug("C++ decode step off: %s", reason)
            return None
        cfg, rotary, head = model.config, model.model.rotary, _head(kernels, model)
        step = kernels.DecodeStep(layers, model.model.norm.weight, rotary.cos, rotary.sin, cfg.num_attention_heads,
                                  cfg.num_key_value_heads, cfg.head_dim, model.model.norm.eps, cfg.head_dim ** -0.5,
                                  model.model.embed_tokens.weight, head)
        return cls(step, bool(head.kind))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One decode-only step (``metadata.prefills`` empty): writes each layer's new K/V into the cache
        and returns the final-normed hidden states (M, H) and the logits (M, V) (or None), in the model's
        dtype, and each row's greedy token (M,) int64 (or None), the sampler's ``greedy_argmax`` of them."""
        return self._step.forward(input_ids, positions, metadata.slot_mapping, metadata.decode_block_tables,
                                  metadata.decode_seq_lens)

    def steps(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
              num_steps: int) -> torch.Tensor:
        """``num_steps`` greedy decode steps in one call (``runs_steps`` only): step s runs at positions + s on
        step s - 1's greedy tokens, writing K/V into slots the block tables must already hold -> the tokens
        (num_steps, M) int64, each row what ``__call__``'s greedy tokens would be step after step."""
        return self._step.forward_steps(input_ids, positions, metadata.decode_block_tables, metadata.decode_seq_lens,
                                        num_steps)


def _unsupported(model: nn.Module, backend_name: str) -> str | None:
    """Why the model as a whole cannot run as a C++ step, or None."""
    from tokenmill.models.llama import LlamaForCausalLM

    if os.environ.get("TOKENMILL_NO_CPU_DECODE_STEP") == "1":
        return "TOKENMILL_NO_CPU_DECODE_STEP=1"
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    if getattr(model, "weight_streamer", None) is not None:
        return "weights are offloaded (the C++ step holds every layer's weights)"
    if model.model.stage.size > 1:
        return "one stage of a pipeline (the C++ step runs the whole stack)"
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu" or triton_ops(weight.device) is not None:
        return "not on CPU, or the Triton ops run there"
    if backend_name != "cpu":
        return f"attention backend {backend_name!r} (the C++ step calls the 'cpu' backend's kernels)"
    if model.model.embed_tokens.tp.size > 1:
        return "tensor parallel (the C++ step has no all-reduce)"
    if model.config.moe is not None:
        return "mixture-of-experts layers"
    if any(layer.self_attn.q_norm is not None for layer in model.model.layers):
        return "q/k norms (Qwen3)"
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(norm.out_dtype != weight.dtype or norm.weight.dtype != torch.float32 for norm in norms):
        return "norms whose output dtype differs from the model's"
    return None


def _head(kernels, model: nn.Module):
    """The LM head as a ``kernels.LinearSpec`` (the C++ step then returns logits), or an empty spec where
    the model's ``compute_logits`` does more than apply it (a subclass's own) or the head has no C++ form."""
    from tokenmill.models.llama import LlamaForCausalLM

    head = model.lm_head  # one rank's whole head: the step is never built under tensor parallelism
    spec = None
    if type(model).compute_logits is LlamaForCausalLM.compute_logits:
        spec = head.quant_method.decode_spec(head, kernels)
    return spec if spec is not None else kernels.LinearSpec()


def _layer(kernels, layer: nn.Module, cache, dtype: torch.dtype):
    """A ``kernels.DecodeLayer`` for one decoder layer and its KV cache, or the reason it cannot be one."""
    out = kernels.DecodeLayer()
    out.input_norm, out.post_attention_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
    for name, linear in (("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                         ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
        spec = linear.quant_method.decode_spec(linear, kernels)
        if spec is None:
            return f"{name} projection has no C++ form ({linear.quant_method.name})"
        setattr(out, name, spec)
    if isinstance(cache, Int8KVCache):
        out.kv_cache, out.kv_scales = cache.codes, cache.scales
    elif isinstance(cache, torch.Tensor) and cache.dtype == dtype:
        out.kv_cache = cache
    else:
        return f"KV cache {type(cache).__name__} ({getattr(cache, 'dtype', None)}) has no C++ write"
    return out
