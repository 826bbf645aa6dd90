"""CudaGraphDecodeStep: decode-only steps replayed from CUDA graphs, one per batch-size bucket.

On a GPU, a batch-1 decode step of a 1B model streams its 2.5 GB of weights in ~0.7 ms, but the
Python forward issues ~250 kernel launches, each a few microseconds of interpreter and driver
work: the host sets the pace (~7-8 ms per token). A CUDA graph records one forward's launches
once and replays them with a single call.

A graph replays fixed shapes and fixed addresses, so the step goes through static buffers sized
for the largest bucket (B rows):

    input_ids (B,) int64, positions (B,) int64, slot_mapping (B,) int64,
    block_tables (B, W) int64 with W = ceil(context / block_size), seq_lens (B,) int64

A step of n decodes copies its inputs into rows 0..n-1 and replays the smallest bucket b >= n;
rows n..b-1 are padding: slot -1 (the KV write skips it) and length 0 (attention reads nothing
and gives 0); their outputs are dropped. Each graph's attention is captured for contexts up to
``context`` tokens (its split count fixed), so every step's context length replays the same
graph. Steps outside (more decodes than the largest bucket, a longer context, prompt chunks)
run the Python forward, as without graphs.

Buckets are captured at start-up, largest first, into one memory pool that the smaller ones
reuse. ``enforce_eager=True`` (``--enforce-eager``, vLLM's name) turns graphs off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.layer import forward_context
from tokenmill.logger import get_logger

logger = get_logger(__name__)

MAX_GRAPH_BATCH = 256
"""The largest bucket; bigger decode batches spend most of a step computing, not launching."""
MAX_GRAPH_CONTEXT = 8192
"""Contexts the graphs serve; a longer one runs the Python forward (its attention, not the launches,
dominates there, and a graph's fixed splits would be sized for the longest context)."""

Outputs = tuple[torch.Tensor, torch.Tensor]  # hidden (b, H), logits (b, V)


@dataclass(frozen=True)
class GraphLimits:
    """What the engine lets a decode step hold: the batch and context bounds of its requests."""

    max_num_seqs: int
    max_model_len: int
    block_size: int


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes: 1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included) or 256."""
    cap = min(max_num_seqs, MAX_GRAPH_BATCH)
    return sorted({s for s in [1, 2, 4, *range(8, MAX_GRAPH_BATCH + 1, 8)] if s < cap} | {cap})


class CudaGraph:
    """``forward`` captured once into a torch.cuda.CUDAGraph (after a warm-up run on a side stream,
    which compiles Triton kernels and lets cuBLAS choose its own); ``replay`` reruns its launches and
    returns the same output tensors, overwritten."""

    def __init__(self, forward: Callable[[], Outputs], pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = forward()

    def replay(self) -> Outputs:
        self.graph.replay()
        return self.outputs


class RerunGraph:
    """A stand-in for ``CudaGraph`` where there is no CUDA (tests of the static buffers and padding under
    Triton's interpreter): ``replay`` runs ``forward`` again over the same buffers."""

    def __init__(self, forward: Callable[[], Outputs], pool=None):
        self.forward = forward

    def replay(self) -> Outputs:
        return self.forward()


class CudaGraphDecodeStep:
    """``step(input_ids (n,), positions (n,), metadata) -> (hidden (n, H), logits (n, V))`` for decode-only
    steps, replayed from the bucket that holds n rows; None where the step falls outside every bucket
    (the runner then runs the Python forward)."""

    def __init__(self, model: nn.Module, limits: GraphLimits, device: torch.device,
                 graph_type: type = CudaGraph, sizes: list[int] | None = None):
        self.model = model
        self.sizes = sizes or capture_sizes(limits.max_num_seqs)
        self.context = min(limits.max_model_len, MAX_GRAPH_CONTEXT)
        rows, width = self.sizes[-1], -(-self.context // limits.block_size)
        zeros = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(rows, **zeros)
        self.positions = torch.zeros(rows, **zeros)
        self.slot_mapping = torch.full((rows,), -1, **zeros)
        self.block_tables = torch.zeros(rows, width, **zeros)
        self.seq_lens = torch.zeros(rows, **zeros)
        pool = torch.cuda.graph_pool_handle() if graph_type is CudaGraph else None
        self.graphs: dict[int, CudaGraph | RerunGraph] = {}
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
                self.graphs[size] = graph_type(self._forward_fn(size), pool)

    @classmethod
    def build(cls, model: nn.Module, backend_name: str, limits: GraphLimits | None,
              device: torch.device) -> CudaGraphDecodeStep | None:
        """Graphs for ``model`` on ``device``, or None (with the reason logged) where the step cannot be
        captured or graphs are off (``limits`` None)."""
        reason = _unsupported(model, backend_name, limits, device)
        if reason is not None:
            logger.debug("CUDA graphs off: %s", reason)
            return None
        start = time.perf_counter()
        try:
            step = cls(model, limits, device)
        except Exception as error:  # a capture the driver refuses must not stop the engine: run eagerly
            logger.warning("CUDA graphs off: capturing the decode step failed (%s: %s); every step runs the "
                           "Python forward", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            torch.cuda.synchronize(device)
            return None
        logger.info("CUDA graphs: %d decode batch sizes (1 to %d), contexts up to %d tokens, captured in %.1f s",
                    len(step.sizes), step.sizes[-1], step.context, time.perf_counter() - start)
        return step

    def _forward_fn(self, size: int) -> Callable[[], Outputs]:
        metadata = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], num_decodes=size, decode_block_tables=self.block_tables[:size],
            decode_seq_lens=self.seq_lens[:size], max_decode_seq_len=self.context, decode_mask=None)

        def forward() -> Outputs:
            with forward_context(metadata):
                hidden = self.model(self.input_ids[:size], self.positions[:size])  # (size, H)
            return hidden, self.model.compute_logits(hidden)  # (size, V)
        return forward

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        """(hidden (n, H), logits (n, V), None: no greedy tokens, the sampler picks them), or None where the
        batch is outside what the graphs hold."""
        n = input_ids.shape[0]
        tables = metadata.decode_block_tables  # (n, w)
        if (n > self.sizes[-1] or metadata.max_decode_seq_len > self.context
                or tables.shape[1] > self.block_tables.shape[1]):
            return None
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(metadata.slot_mapping)
        self.seq_lens[:n].copy_(metadata.decode_seq_lens)
        self.block_tables[:n, :tables.shape[1]].copy_(tables)
        if size > n:  # padding rows write no KV and attend to nothing
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(0)
        hidden, logits = self.graphs[size].replay()
        # Copies: the graph overwrites its outputs at the next replay, and callers may keep these.
        return hidden[:n].clone(), logits[:n].clone(), None


def _unsupported(model: nn.Module, backend_name: str, limits: GraphLimits | None, device: torch.device) -> str | None:
    """Why decode steps of ``model`` cannot be graphs, or None."""
    if limits is None:
        return "enforce_eager, or several ranks (their collectives go through gloo and host memory)"
    if device.type != "cuda":
        return f"device {device} (graphs are a CUDA feature)"
    if backend_name != "triton":
        return f"attention backend {backend_name!r} (the Triton backend skips padded rows)"
    if getattr(model, "weight_streamer", None) is not None:
        return "weights are offloaded (their copies run on a side stream between layers)"
    stage = getattr(model, "stage", None)
    if stage is not None and stage.size > 1:
        return "one stage of a pipeline"
    if getattr(model.config, "moe", None) is not None:
        return "mixture-of-experts layers (rows per expert are counted on the host)"
    return None
