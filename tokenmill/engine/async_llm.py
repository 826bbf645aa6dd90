"""AsyncLLM: the asyncio front end of a served engine.

The engine core steps in its own process (``core_proc.py``). This process tokenises, detokenises
and talks HTTP, and its event loop never does the text work itself:
- tokenisation and chat templates run in a pool of worker threads (``run_blocking``);
- a reader thread receives the core's outputs, turns them into RequestOutputs
  (``EngineFrontend.process_outputs``: detokenisation, stop strings) and hands them to the loop,
  which only puts each on its request's queue (one per HTTP request).
``outputs`` yields from that queue. When the caller stops listening (client gone, timeout, error),
the ``finally`` aborts the request in the core, which frees its KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineLimits, EngineStats
from tokenmill.engine.core_proc import CoreClient, EngineDeadError
from tokenmill.engine.llm_engine import EngineFrontend, PromptType, frontend_tokenizer
from tokenmill.errors import TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


class RequestTimeoutError(TokenmillError):
    """A request ran past its time limit and was aborted."""


class ServerShutdownError(TokenmillError):
    """The server is stopping: in-flight requests are aborted and new ones refused."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, engine_process: bool = True, num_threads: int | None = None,
                 make_client: Callable | None = None):
        """``make_client(config, tokenizer_eos)``: the core client to use (a data-parallel router), instead
        of one engine core process."""
        self.config = config
        self.tokenizer = frontend_tokenizer(config)
        eos = tuple(self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.client = (make_client(config, eos) if make_client else
                       CoreClient(config, eos, use_process=engine_process, num_threads=num_threads))
        self.frontend = EngineFrontend(config, self.tokenizer, self.client)
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None
        self.shutting_down = False
        self.on_finished: Callable[[RequestOutput], None] | None = None
        """Called with every finished RequestOutput (metrics), from the reader thread."""
        self.on_stats: Callable[[EngineStats], None] | None = None
        """Called with every stats snapshot (metrics), from the reader thread."""
        self.on_dead: Callable[[], None] | None = None
        """Called once when the engine core has failed (metrics)."""
        self.on_replica_dead: Callable[[str], None] | None = None
        """Called when one data-parallel replica has failed and the others go on (metrics, logs)."""
        self._queues: dict[str, asyncio.Queue] = {}
        self._num_sequences: dict[str, int] = {}  # request id -> sequences it runs (n, best_of, beams)
        self.num_in_flight = 0
        """Sequences of the requests in flight, as the batch will hold them."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="tokenmill-text")

    @property
    def limits(self) -> EngineLimits:
        return self.client.limits

    def start(self) -> None:
        """Starts receiving the core's outputs on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="tokenmill-output-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """The reader thread: the core's messages, turned into RequestOutputs here, off the event loop."""
        while True:
            message = self.client.recv()
            if message[0] == "outputs":
                _, core_outputs, stats = message
                outputs = self.frontend.process_outputs(core_outputs)
                self.stats = stats
                if self.on_stats:
                    self.on_stats(stats)
                if self.on_finished:
                    for output in outputs:
                        if output.finished:
                            self.on_finished(output)
                if not self._call_soon(self._deliver, outputs):
                    return
            elif message[0] == "replica_dead":  # a router's replica: only its requests fail
                if not self._call_soon(self._on_replica_dead, message[1], message[2]):
                    return
            elif message[0] == "dead":
                self.client.reap()  # a killed core must not linger as a zombie
                self._call_soon(self._on_dead, message[1])
                return

    def _call_soon(self, callback, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the event loop is closed: shutting down
            return False

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _on_dead(self, reason: str) -> None:
        self.dead_reason = reason
        if self.on_dead:
            self.on_dead()
        self._fail_all(EngineDeadError(f"the engine failed: {reason}"))

    def _on_replica_dead(self, request_ids: list[str], reason: str) -> None:
        if self.on_replica_dead:
            self.on_replica_dead(reason)
        error = EngineDeadError(reason)
        for request_id in request_ids:  # core ids: a sample's or beam's id is its request's id + "#..."
            key = request_id
            while key not in self._queues and "#" in key:
                key = key.rsplit("#", 1)[0]
            queue = self._queues.get(key)
            if queue is not None:
                queue.put_nowait(error)

    def _fail_all(self, error: Exception) -> None:
        for queue in {id(q): q for q in self._queues.values()}.values():
            queue.put_nowait(error)

    def check_health(self) -> None:
        """Raises EngineDeadError or ServerShutdownError when no request can be served now."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine failed: {self.dead_reason}")
        if self.shutting_down:
            raise ServerShutdownError("the server is shutting down")

    async def run_blocking(self, fn: Callable, *args):
        """Runs text work (tokenisation, chat templates, decoding) in a worker thread, off the event loop."""
        return await self._loop.run_in_executor(self._pool, fn, *args)

    async def add_requests(self, prompts: list[PromptType], params: SamplingParams, request_ids: list[str],
                           queue: asyncio.Queue) -> None:
        """Tokenizes (in a worker thread) and queues one request per prompt, all sending their
        outputs to ``queue``. All or nothing: RequestError (a bad prompt) or EngineDeadError with
        none left queued."""
        self.check_health()
        for request_id in request_ids:  # before the core can answer, so that no output finds no queue
            self._queues[request_id] = queue
            self._num_sequences[request_id] = params.num_sequences
            self.num_in_flight += params.num_sequences

        def add_all() -> None:
            for request_id, prompt in zip(request_ids, prompts):
                self.frontend.add_request(prompt, params, request_id)

        future = self._loop.run_in_executor(self._pool, add_all)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:  # the worker may still add them: abort once it is done
            future.add_done_callback(lambda _: [self.abort(request_id) for request_id in request_ids])
            raise
        except BaseException:
            for request_id in request_ids:
                self.abort(request_id)
            raise

    def abort(self, request_id: str) -> None:
        """Stops a request in the core (its blocks are freed before the next step); no-op once finished."""
        if self._release(request_id) and self.dead_reason is None:
            self.frontend.abort_request(request_id)

    def _release(self, request_id: str) -> bool:
        """Forgets a request's queue and sequences; False if it was not in flight."""
        if self._queues.pop(request_id, None) is None:
            return False
        self.num_in_flight -= self._num_sequences.pop(request_id)
        return True

    def request_shutdown(self, reason: str) -> None:
        """Thread- and signal-safe: every in-flight request ends now with ServerShutdownError, and no
        new one is taken."""
        self.shutting_down = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._abort_all, reason)

    def _abort_all(self, reason: str) -> None:
        self._fail_all(ServerShutdownError(reason))
        for request_id in list(self._queues):
            self.abort(request_id)

    async def outputs(self, queue: asyncio.Queue, request_ids: list[str],
                      timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the requests' outputs (cumulative) until all have finished.

        Leaving early (the caller stops, an error, the timeout) aborts the unfinished ones.
        """
        unfinished = set(request_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(f"the request ran past its {timeout:g} s time limit") from None
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                    self._release(item.request_id)
                yield item
        finally:
            for request_id in unfinished:
                self.abort(request_id)

    def shutdown(self) -> None:
        """Stops the engine core (terminating it if it does not stop within seconds) and the workers."""
        self.shutting_down = True
        self.client.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
