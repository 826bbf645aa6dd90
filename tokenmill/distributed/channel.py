"""Point-to-point messages between an engine's ranks, over a gloo group of all of them.

Two kinds travel: a *step* (a picklable object, such as ``("step", SchedulerOutput)``, with the
tensors the previous pipeline stage computed) handed from rank to rank down the pipeline, and a
*result* (the last stage's ``ModelRunnerOutput``) handed back to rank 0. A message is a length,
the pickled object with the tensors' names, dtypes and shapes, then each tensor, every part on
its own tag so that the receiver can size its buffers.

Sends return at once (gloo sends in the background; the tensors are kept until it is done), so a
stage never waits for the next one to be ready. A worker waiting for its next step waits without
a time limit (an idle server sends nothing for as long as it is idle), yet learns at once when the
sender dies: its socket closes. Every other receive has the group's timeout.
"""

from __future__ import annotations

import pickle
from collections import deque
from datetime import timedelta
from typing import Any

import torch

STEP_TAGS, RESULT_TAGS = 0, 100  # first tag of each kind of message
_NO_LIMIT = timedelta(days=365)


class Channel:
    """Sends and receives messages over ``process_group`` (gloo, with every rank of the engine)."""

    def __init__(self, process_group: Any):
        self._pg = process_group
        self._sending: deque[tuple[list, list[torch.Tensor]]] = deque()  # (gloo works, their buffers)

    def send(self, dst: int, obj: Any, tensors: dict[str, torch.Tensor] | None = None, tags: int = STEP_TAGS) -> None:
        """Starts sending ``obj`` and ``tensors`` to rank ``dst``; returns without waiting. (Tensors travel
        through host memory: gloo sends CPU tensors; the receiver gets them on the CPU.)"""
        tensors = tensors or {}
        parts = [t.cpu().contiguous() for t in tensors.values()]
        meta = pickle.dumps((obj, [(name, t.dtype, tuple(t.shape)) for name, t in zip(tensors, parts)]))
        parts = [torch.tensor([len(meta)], dtype=torch.int64), torch.frombuffer(bytearray(meta), dtype=torch.uint8)] + parts
        works = [self._pg.send([part], dst, tags + i) for i, part in enumerate(parts)]
        self._sending.append((works, parts))
        while self._sending and all(work.is_completed() for work in self._sending[0][0]):
            for work in self._sending.popleft()[0]:
                work.wait()  # raises what went wrong, if anything did

    def recv(self, src: int, tags: int = STEP_TAGS, wait_without_limit: bool = False
             ) -> tuple[Any, dict[str, torch.Tensor]]:
        """(object, tensors) of the next message from rank ``src``. ``wait_without_limit``: the first part
        may take any time to come (a worker between steps); RuntimeError as soon as ``src`` is gone."""
        length = torch.empty(1, dtype=torch.int64)
        work = self._pg.recv([length], src, tags)
        work.wait(_NO_LIMIT) if wait_without_limit else work.wait()
        meta = torch.empty(int(length), dtype=torch.uint8)
        self._pg.recv([meta], src, tags + 1).wait()
        obj, specs = pickle.loads(meta.numpy().tobytes())
        tensors = {}
        for i, (name, dtype, shape) in enumerate(specs):
            tensors[name] = torch.empty(shape, dtype=dtype)
            self._pg.recv([tensors[name]], src, tags + 2 + i).wait()
        return obj, tensors

    def flush(self) -> None:
        """Waits until every message started has been delivered (before a rank exits)."""
        while self._sending:
            for work in self._sending.popleft()[0]:
                work.wait()
