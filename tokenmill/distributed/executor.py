"""TensorParallelExecutor: one model over ``tensor_parallel_size`` processes.

The engine's process is rank 0: it starts ranks 1 .. N - 1 (spawned processes running
``worker.worker_main``), joins the gloo group with them, and builds its own slice of the model.
Each step it broadcasts the ``SchedulerOutput`` and runs its runner; every rank runs the same
forward pass, so the all-reduces inside the layers pair up. Only rank 0 samples: the scheduler and
the sampled tokens exist once, and the next step's ``SchedulerOutput`` carries them to the workers.

Each process gets ``threads // N`` threads (at least 1): on a small machine, ranks that each spin
all cores slow every product down many times.
"""

from __future__ import annotations

import multiprocessing
import time
import weakref

import torch
from torch import nn

from tokenmill.distributed.launch import torchrun_rank
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.distributed.worker import worker_main
from tokenmill.logger import get_logger
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput

logger = get_logger(__name__)


class TensorParallelExecutor:
    """Starts the worker ranks; ``runner(...)`` then wraps rank 0's ModelRunner for the engine."""

    def __init__(self, config):
        size = config.tensor_parallel_size
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
                                              name=f"tokenmill-tp-rank{rank}", daemon=True)
                              for rank in range(1, size)]
            for process in self.processes:
                process.start()
        try:
            _wait_for_workers(store, size, self.processes, config.distributed_timeout_s)
            self.group = TensorParallelGroup.join(0, size, config.distributed_timeout_s, store,
                                                  expert_parallel=config.enable_expert_parallel)
        except BaseException:
            _stop(None, self.processes, self._threads_before)
            raise
        torch.set_num_threads(threads)
        self._store = store  # rank 0 may host the rendezvous; it must outlive the group
        logger.info("tensor parallel: %d ranks (gloo%s), %d thread(s) each%s", size,
                    ", launched by torchrun" if launched else "", threads,
                    ", experts placed whole on the ranks (expert parallel)" if config.enable_expert_parallel else "")
        self._finalizer = weakref.finalize(self, _stop, self.group, self.processes, self._threads_before)

    def runner(self, driver_runner, num_blocks: int) -> "TensorParallelRunner":
        """Tells the workers the KV cache size (so that every rank's block ids mean the same slots)."""
        self.group.broadcast_object(num_blocks)
        return TensorParallelRunner(driver_runner, self)

    def shutdown(self) -> None:
        self._finalizer()

    def failure(self, error: Exception) -> RuntimeError:
        """A collective failed: an error naming the worker that died (a dead peer breaks gloo's sockets,
        so rank 0 learns at its next collective), or the collective's own error."""
        for process in self.processes:
            process.join(timeout=1.0)  # a killed worker is reaped within moments of its sockets closing
        dead = [f"rank {rank} (exit code {process.exitcode})" for rank, process in enumerate(self.processes, start=1)
                if process.exitcode is not None]
        if dead:
            return RuntimeError(f"tensor-parallel worker {', '.join(dead)} died; this engine cannot continue "
                                f"(gloo: {str(error).splitlines()[0][:200]})")
        return RuntimeError(f"a tensor-parallel collective failed: {error}")


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
                raise RuntimeError(f"tensor-parallel rank {rank} exited with code {processes[rank - 1].exitcode} "
                                   "before joining (its error is printed above; a script that starts an engine "
                                   "with tensor_parallel_size > 1 needs an `if __name__ == \"__main__\":` guard)")
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel rank(s) {sorted(waiting)} did not start within {timeout_s:.0f} s")
        time.sleep(0.05)


def _stop(group: TensorParallelGroup | None, processes: list, threads_before: int) -> None:
    if group is not None:
        try:
            group.broadcast_object(None)
        except Exception:  # noqa: BLE001 - a worker already gone: nothing to tell it
            pass
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    torch.set_num_threads(threads_before)


class TensorParallelRunner:
    """The engine's runner under tensor parallelism: rank 0's ModelRunner, each step broadcast first."""

    def __init__(self, driver_runner, executor: TensorParallelExecutor):
        self.driver, self.executor = driver_runner, executor

    @property
    def model(self) -> nn.Module:
        return self.driver.model

    def __getattr__(self, name: str):  # decode_step, requests, kv_caches...: rank 0's
        return getattr(self.driver, name)

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self._run("step", so, self.driver.execute)

    def execute_logits(self, so: SchedulerOutput) -> dict[str, torch.Tensor]:
        return self._run("logits", so, self.driver.execute_logits)

    def _run(self, kind: str, so: SchedulerOutput, call):
        try:
            self.executor.group.broadcast_object((kind, so))
            return call(so)
        except RuntimeError as e:  # gloo reports a dead peer as a socket error
            raise self.executor.failure(e) from e
