"""DistributedExecutor: one model over ``tensor_parallel_size`` x ``pipeline_parallel_size`` processes.

The engine's process is rank 0 (pipeline stage 0, tensor-parallel rank 0): it starts the other
ranks (spawned processes running ``worker.worker_main``), joins their gloo groups and builds its
own part of the model. Each step it sends the ``SchedulerOutput`` to the other ranks of stage 0 and
runs its own part; each stage hands its output (hidden state and residual) to the same
tensor-parallel rank of the next stage; the last stage samples (its tensor-parallel rank 0 alone)
and sends the ``ModelRunnerOutput`` back to rank 0. So the scheduler and the sampled tokens exist
once, and the next step's ``SchedulerOutput`` carries the tokens to every rank.

Under pipeline parallelism a step returns a ``PendingResult`` at once: the engine schedules the
next batch (other requests) while the later stages still work on this one, so that stages overlap.

Each process gets ``threads // N`` threads (at least 1): on a small machine, ranks that each spin
all cores slow every product down many times.
"""

from __future__ import annotations

import multiprocessing
import time
import weakref

import torch
from torch import nn

from tokenmill.distributed.channel import RESULT_TAGS, Channel
from tokenmill.distributed.launch import torchrun_rank
from tokenmill.distributed.parallel_state import (ParallelLayout, PipelineStage, TensorParallelGroup,
                                                  join_gloo)
from tokenmill.distributed.worker import worker_main
from tokenmill.logger import get_logger
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput

logger = get_logger(__name__)


class DistributedExecutor:
    """Starts the worker ranks; ``runner(...)`` then wraps rank 0's ModelRunner for the engine."""

    def __init__(self, config):
        self.layout = layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size)
        size = layout.world_size
        launched = torchrun_rank()
        self._threads_before = torch.get_num_threads()
        threads = max(1, self._threads_before // (launched.local_world_size if launched else size))
        self.processes = []
        if launched is not None:  # torchrun started the other ranks; its store is where they meet
            store = (TensorParallelGroup.connect(launched.master_addr, launched.master_port, size,
                                                 config.distributed_timeout_s) if launched.agent_store else
                     TensorParallelGroup.listen(size, config.distributed_timeout_s, launched.master_addr,
                                                launched.master_port))
        else:
            store = TensorParallelGroup.listen(size, config.distributed_timeout_s)
            context = multiprocessing.get_context("spawn")
            self.processes = [context.Process(target=worker_main, args=(rank, size, store.port, config, threads),
                                              name=f"tokenmill-rank{rank}", daemon=True)
                              for rank in range(1, size)]
            for process in self.processes:
                process.start()
        self.group = self.channel = None
        try:
            _wait_for_workers(store, size, self.processes, config.distributed_timeout_s)
            self.group = TensorParallelGroup.join(0, layout.tensor_parallel_size, config.distributed_timeout_s, store,
                                                  expert_parallel=config.enable_expert_parallel)
            self.channel = Channel(join_gloo(0, size, config.distributed_timeout_s, store, "world"))
        except BaseException:
            _stop(self.channel, layout, self.processes, self._threads_before)
            raise
        self.stage = PipelineStage(0, layout.pipeline_parallel_size)
        torch.set_num_threads(threads)
        self._store = store  # rank 0 may host the rendezvous; it must outlive the groups
        logger.info("distributed: tensor parallel %d x pipeline parallel %d = %d ranks (gloo%s), %d thread(s) each%s",
                    layout.tensor_parallel_size, layout.pipeline_parallel_size, size,
                    ", launched by torchrun" if launched else "", threads,
                    ", experts placed whole on the ranks (expert parallel)" if config.enable_expert_parallel else "")
        self._finalizer = weakref.finalize(self, _stop, self.channel, layout, self.processes, self._threads_before)

    def runner(self, driver_runner, num_blocks: int, kv_dtype: torch.dtype, eos_token_ids: list[int]
               ) -> "DistributedRunner":
        """Tells the workers the KV cache's size and dtype (so that every rank's block ids mean the same
        slots) and the end-of-sequence ids (the last stage samples)."""
        for rank in range(1, self.layout.world_size):
            self.channel.send(rank, (num_blocks, kv_dtype, list(eos_token_ids)))
        return DistributedRunner(driver_runner, self)

    def shutdown(self) -> None:
        self._finalizer()

    def failure(self, error: Exception) -> RuntimeError:
        """A collective or message failed: an error naming the worker that died (a dead peer breaks gloo's
        sockets, so rank 0 learns at its next collective or message), or the operation's own error."""
        for process in self.processes:
            process.join(timeout=1.0)  # a killed worker is reaped within moments of its sockets closing
        dead = [f"rank {rank} (exit code {process.exitcode})" for rank, process in enumerate(self.processes, start=1)
                if process.exitcode is not None]
        if dead:
            return RuntimeError(f"distributed worker {', '.join(dead)} died; this engine cannot continue "
                                f"(gloo: {str(error).splitlines()[0][:200]})")
        return RuntimeError(f"a distributed collective or message failed: {error}")


def _wait_for_workers(store, size: int, processes: list, timeout_s: float) -> None:
    """Returns once every worker rank has reached the store; RuntimeError naming a worker this process
    started that exited first (an import error, a missing ``if __name__ == "__main__":`` guard in a
    spawning script) or the ranks still missing at the timeout."""
    deadline = time.monotonic() + timeout_s
    waiting = set(range(1, size))
    while waiting:
        for rank in sorted(waiting):
            if TensorParallelGroup.started(store, rank):
                waiting.discard(rank)
            elif rank <= len(processes) and processes[rank - 1].exitcode is not None:
                raise RuntimeError(f"distributed rank {rank} exited with code {processes[rank - 1].exitcode} "
                                   "before joining (its error is printed above; a script that starts an engine "
                                   "over several processes needs an `if __name__ == \"__main__\":` guard)")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"distributed rank(s) {sorted(waiting)} did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _stop(channel: Channel | None, layout: ParallelLayout, processes: list, threads_before: int) -> None:
    """Sends "stop" down every chain of ranks (each worker passes it on to the next stage and exits)."""
    if channel is not None:
        try:
            for rank in _first_hops(layout):
                channel.send(rank, ("stop", None))
            channel.flush()
        except Exception:  # noqa: BLE001 - a worker already gone: nothing to tell it
            pass
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    torch.set_num_threads(threads_before)


def _first_hops(layout: ParallelLayout) -> list[int]:
    """The ranks rank 0 sends each step to: the rest of stage 0, and stage 1's first rank. (Stage 1's other
    ranks get it from the rest of stage 0.)"""
    ranks = list(range(1, layout.tensor_parallel_size))
    return ranks + ([layout.rank_of(1, 0)] if layout.pipeline_parallel_size > 1 else [])


class PendingResult:
    """A step's ``ModelRunnerOutput`` (or logits) still in the pipeline; ``result()`` waits for it."""

    def __init__(self, runner: "DistributedRunner", value=None, ready: bool = False):
        self._runner, self._value, self._ready = runner, value, ready

    def result(self):
        if not self._ready:
            executor = self._runner.executor
            last = executor.layout.rank_of(executor.layout.pipeline_parallel_size - 1, 0)
            try:
                self._value, _ = executor.channel.recv(last, tags=RESULT_TAGS)
            except RuntimeError as e:
                raise executor.failure(e) from e
            self._ready = True
        return self._value


class DistributedRunner:
    """The engine's runner over several ranks: rank 0's ModelRunner, each step sent to the others first."""

    def __init__(self, driver_runner, executor: DistributedExecutor):
        self.driver, self.executor = driver_runner, executor

    @property
    def model(self) -> nn.Module:
        return self.driver.model

    @property
    def max_concurrent_batches(self) -> int:
        """Steps that may be in flight at once: one per pipeline stage."""
        return self.executor.layout.pipeline_parallel_size

    def __getattr__(self, name: str):  # decode_step, requests, kv_caches...: rank 0's
        return getattr(self.driver, name)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(so).result()

    def execute_async(self, so: SchedulerOutput) -> PendingResult:
        """Starts the step; under pipeline parallelism returns while the later stages run it."""
        return self._submit("step", so, self.driver.execute)

    def execute_logits(self, so: SchedulerOutput) -> dict[str, torch.Tensor]:
        return self._submit("logits", so, self.driver.execute_logits).result()

    def _submit(self, kind: str, so: SchedulerOutput, call) -> PendingResult:
        executor = self.executor
        layout = executor.layout
        try:
            for rank in range(1, layout.tensor_parallel_size):
                executor.channel.send(rank, (kind, so))
            output = call(so)
            if layout.pipeline_parallel_size == 1:
                return PendingResult(self, output, ready=True)
            executor.channel.send(layout.rank_of(1, 0), (kind, so), output.tensors)
            return PendingResult(self)
        except RuntimeError as e:  # gloo reports a dead peer as a socket error
            raise executor.failure(e) from e
