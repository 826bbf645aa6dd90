"""Where this process stands among an engine's ranks: its tensor-parallel group (and the collectives),
its pipeline stage, and how ranks are laid out.

Layers capture the group and stage current at construction (``tensor_parallel_group()``,
``pipeline_stage()``, set with ``building_for(group, stage)`` while the model is built), so a model
keeps its own for its whole life and two engines in one process never share one. A model built
outside ``building_for`` gets ``SINGLE`` (rank 0 of 1), whose collectives do nothing, and
``WHOLE_MODEL``.

Groups are gloo process groups made directly from a TCP store (not torch.distributed's global
default group), with a timeout on every collective: a rank that never joins or dies fails the
others' calls with an error instead of hanging them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist


class TensorParallelGroup:
    """``size`` processes that each hold 1/size of every layer; this one is ``rank``."""

    def __init__(self, rank: int, size: int, process_group: Any = None, expert_parallel: bool = False):
        """``expert_parallel``: mixture-of-experts layers place whole experts on the ranks instead of
        splitting every expert's rows."""
        self.rank, self.size, self._pg, self.expert_parallel = rank, size, process_group, expert_parallel

    @staticmethod
    def listen(size: int, timeout_s: float, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Rank 0's rendezvous store (port 0: any free port; read it from ``store.port``)."""
        return dist.TCPStore(host, port, size, is_master=True, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @staticmethod
    def connect(host: str, port: int, size: int, timeout_s: float) -> Any:
        """A client of the store at host:port (a worker's, or every rank's under torchrun's agent store)."""
        return dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=timeout_s))

    @classmethod
    def join(cls, rank: int, size: int, timeout_s: float, store: Any, expert_parallel: bool = False,
             name: str = "tp0") -> "TensorParallelGroup":
        """Joins group ``name`` (its keys go under "tokenmill/<name>/" in ``store``) as its ``rank`` of ``size``.
        RuntimeError if the members have not all joined within ``timeout_s``."""
        return cls(rank, size, join_gloo(rank, size, timeout_s, store, name), expert_parallel)

    @staticmethod
    def mark_started(store: Any, rank: int) -> None:
        """Worker ``rank`` tells rank 0 that it is up (``started``), before it joins any group."""
        dist.PrefixStore("tokenmill", store).set(f"started/{rank}", "1")

    @staticmethod
    def started(store: Any, rank: int) -> bool:
        """Whether worker ``rank`` has reached ``store``."""
        return dist.PrefixStore("tokenmill", store).check([f"started/{rank}"])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (computed in float32, returned in x's dtype and device; gloo
        works on host memory, so a GPU tensor makes a round trip through it)."""
        if self.size == 1:
            return x
        total = x.float().cpu().contiguous()
        self._pg.allreduce([total]).wait()
        return total.to(x.device, x.dtype)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) on each rank -> (..., size * n), rank order."""
        if self.size == 1:
            return x
        local = x.cpu().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._pg.allgather([parts], [local]).wait()
        return torch.cat(parts, dim=-1).to(x.device)



def join_gloo(rank: int, size: int, timeout_s: float, store: Any, name: str) -> Any:
    """A gloo process group of ``size`` members meeting under "tokenmill/<name>/" in ``store``, with
    ``timeout_s`` on every collective; RuntimeError naming the group if they do not all join in time."""
    try:
        return dist.ProcessGroupGloo(dist.PrefixStore(f"tokenmill/{name}", store), rank, size,
                                     timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - re-raised with the group named
        raise RuntimeError(f"rank {rank} of group {name!r} ({size} ranks): the ranks did not all join within "
                           f"{timeout_s:.0f} s (a rank failed to start, or died): {e}") from None


@dataclass(frozen=True)
class ParallelLayout:
    """How the ranks of one engine are arranged: ``pipeline_parallel_size`` stages of
    ``tensor_parallel_size`` ranks each; rank = stage * tensor_parallel_size + tensor-parallel rank."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_of(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tensor_parallel_size + tp_rank


@dataclass(frozen=True)
class PipelineStage:
    """Stage ``rank`` of ``size`` in a pipeline: a contiguous range of the decoder layers, the embedding
    on the first stage, the final norm and the LM head on the last."""

    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the layers this stage runs: an even split, the earlier stages one layer
        longer where it does not divide (14 layers on 4 stages: 4, 4, 3, 3)."""
        if num_layers < self.size:
            raise ValueError(f"pipeline_parallel_size {self.size} exceeds the model's {num_layers} layers: "
                             "every stage needs at least one")
        base, extra = divmod(num_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def max_layers(self, num_layers: int) -> int:
        """The most layers any stage holds (what sizes every stage's KV cache alike)."""
        return -(-num_layers // self.size)


SINGLE = TensorParallelGroup(0, 1)
WHOLE_MODEL = PipelineStage(0, 1)
_building: TensorParallelGroup = SINGLE
_building_stage: PipelineStage = WHOLE_MODEL


def tensor_parallel_group() -> TensorParallelGroup:
    """The group the model under construction is built for (``SINGLE`` outside ``building_for``)."""
    return _building


def pipeline_stage() -> PipelineStage:
    """The pipeline stage the model under construction is built for (``WHOLE_MODEL`` outside ``building_for``)."""
    return _building_stage


@contextmanager
def building_for(group: TensorParallelGroup, stage: PipelineStage = WHOLE_MODEL) -> Iterator[None]:
    """Layers constructed inside take their shard of ``group``; models build only ``stage``'s layers."""
    global _building, _building_stage
    previous = _building, _building_stage
    _building, _building_stage = group, stage
    try:
        yield
    finally:
        _building, _building_stage = previous


def partition(num_units: int, group: TensorParallelGroup, what: str = "rows", replicate: bool = False
              ) -> tuple[int, int]:
    """(first unit, number of units) of ``num_units`` (heads, rows) that ``group.rank`` holds.

    Units split evenly when there are at least as many as ranks (num_units % size must be 0). With
    ``replicate`` (KV heads), fewer units than ranks are replicated, each over size / num_units
    consecutive ranks: 2 KV heads on 4 ranks -> 0, 0, 1, 1; otherwise that is an error.
    """
    size, rank = group.size, group.rank
    if num_units >= size:
        if num_units % size:
            raise ValueError(f"{num_units} {what} cannot be split evenly over tensor_parallel_size {size}")
        per_rank = num_units // size
        return rank * per_rank, per_rank
    if not replicate:
        raise ValueError(f"{num_units} {what} cannot be split over tensor_parallel_size {size}: fewer than the ranks")
    if size % num_units:
        raise ValueError(f"{num_units} {what} cannot be replicated evenly over tensor_parallel_size {size} "
                         f"(it must be a multiple of {num_units})")
    return rank * num_units // size, 1
