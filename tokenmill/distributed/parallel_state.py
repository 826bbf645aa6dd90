"""The tensor-parallel group: which rank of how many this process is, and the collectives.

Layers capture the group current at construction (``tensor_parallel_group()``, set with
``building_for(group)`` while the model is built), so a model keeps its own group for its whole
life and two engines in one process never share one. A model built outside ``building_for`` gets
``SINGLE`` (rank 0 of 1), whose collectives do nothing.

The group is a gloo process group made directly from a TCP store (not torch.distributed's global
default group), with a timeout on every operation: a rank that never joins or dies fails the
others' calls with an error instead of hanging them.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
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
    def join(cls, rank: int, size: int, timeout_s: float, store: Any, expert_parallel: bool = False
             ) -> "TensorParallelGroup":
        """Joins the group through ``store`` (its keys go under "tokenmill/"); rank > 0 first marks itself
        started, which rank 0 watches for. RuntimeError if the ranks have not all joined within ``timeout_s``."""
        timeout = timedelta(seconds=timeout_s)
        ours = dist.PrefixStore("tokenmill", store)
        try:
            if rank > 0:
                ours.set(f"started/{rank}", "1")
            process_group = dist.ProcessGroupGloo(ours, rank, size, timeout)
        except Exception as e:  # noqa: BLE001 - re-raised with the ranks named
            raise RuntimeError(f"tensor-parallel rank {rank} of {size}: the {size} ranks did not all join within "
                               f"{timeout_s:.0f} s (a rank failed to start, or died): {e}") from None
        return cls(rank, size, process_group, expert_parallel)

    @staticmethod
    def started(store: Any, rank: int) -> bool:
        """Whether worker ``rank`` has reached ``store``."""
        return dist.PrefixStore("tokenmill", store).check([f"started/{rank}"])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks (computed in float32, returned in x's dtype)."""
        if self.size == 1:
            return x
        total = x.float().contiguous()
        self._pg.allreduce([total]).wait()
        return total.to(x.dtype)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) on each rank -> (..., size * n), rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._pg.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; the others pass None)."""
        if self.size == 1:
            return obj
        payload = pickle.dumps(obj) if self.rank == 0 else b""
        length = torch.tensor([len(payload)], dtype=torch.int64)
        self._pg.broadcast(length, 0).wait()
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0
                else torch.empty(int(length), dtype=torch.uint8))
        self._pg.broadcast(data, 0).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())


SINGLE = TensorParallelGroup(0, 1)
_building: TensorParallelGroup = SINGLE


def tensor_parallel_group() -> TensorParallelGroup:
    """The group the model under construction is built for (``SINGLE`` outside ``building_for``)."""
    return _building


@contextmanager
def building_for(group: TensorParallelGroup) -> Iterator[None]:
    """Layers constructed inside take their shard of ``group``."""
    global _building
    previous, _building = _building, group
    try:
        yield
    finally:
        _building = previous


def partition(num_units: int, group: TensorParallelGroup, what: str = "rows") -> tuple[int, int]:
    """(first unit, number of units) of ``num_units`` (heads, rows) that ``group.rank`` holds.

    Units split evenly when there are at least as many as ranks (num_units % size must be 0);
    fewer units than ranks are replicated, each over size / num_units consecutive ranks (KV heads
    with a tensor-parallel degree above their number): 2 KV heads on 4 ranks -> 0, 0, 1, 1.
    """
    size, rank = group.size, group.rank
    if num_units >= size:
        if num_units % size:
            raise ValueError(f"{num_units} {what} cannot be split evenly over tensor_parallel_size {size}")
        per_rank = num_units // size
        return rank * per_rank, per_rank
    if size % num_units:
        raise ValueError(f"{num_units} {what} cannot be replicated evenly over tensor_parallel_size {size} "
                         f"(it must be a multiple of {num_units})")
    return rank * num_units // size, 1
