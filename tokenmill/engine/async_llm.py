"""AsyncLLM: the asyncio front end of a served engine.

The engine core steps in its own process (``core_proc.py``). This process tokenises, detokenises
and talks HTTP. A reader thread receives the core's outputs and hands them to the event loop,
which turns them into RequestOutputs (``EngineFrontend.process_outputs``) and puts each on its
request's queue (one per HTTP request). ``outputs`` yields from that queue. When the caller stops listening
(client gone, timeout, error), the ``finally`` aborts the request in the core, which frees its
KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
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


class AsyncLLM:
    def __init__(self, config: EngineConfig, engine_process: bool = True, num_threads: int | None = None):
        self.config = config
        self.tokenizer = frontend_tokenizer(config)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
        self.client = CoreClient(config, tuple(eos), use_process=engine_process, num_threads=num_threads)
        self.frontend = EngineFrontend(config, self.tokenizer, self.client)
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None
        self.on_finished: Callable[[RequestOutput], None] | None = None
        """Called with every finished RequestOutput (metrics)."""
        self.on_stats: Callable[[EngineStats], None] | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    @property
    def limits(self) -> EngineLimits:
        return self.client.limits

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        """Starts receiving the core's outputs on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="tokenmill-output-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            message = self.client.recv()
            try:
                self._loop.call_soon_threadsafe(self._on_message, message)
            except RuntimeError:  # the event loop is closed: shutting down
                return
            if message[0] == "dead":
                return

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            self.stats = message[2]
            if self.on_stats:
                self.on_stats(self.stats)
            for output in self.frontend.process_outputs(message[1]):
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
                if output.finished and self.on_finished:
                    self.on_finished(output)
        elif kind == "dead":
            self.dead_reason = message[1]
            for queue in {id(q): q for q in self._queues.values()}.values():
                queue.put_nowait(EngineDeadError(f"the engine failed: {self.dead_reason}"))

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine failed: {self.dead_reason}")

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str, queue: asyncio.Queue) -> None:
        """Queues a request whose outputs go to ``queue`` (which several requests may share).

        Raises RequestError (bad request) or EngineDeadError at once, with nothing queued.
        """
        self.check_health()
        self.frontend.add_request(prompt, params, request_id)
        self._queues[request_id] = queue

    def abort(self, request_id: str) -> None:
        """Stops a request in the core (its blocks are freed before the next step); no-op once finished."""
        if self._queues.pop(request_id, None) is not None and self.dead_reason is None:
            self.frontend.abort_request(request_id)

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
                    self._queues.pop(item.request_id, None)
                yield item
        finally:
            for request_id in unfinished:
                self.abort(request_id)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """A conversation rendered with the chat template: {"prompt", "prompt_token_ids"}."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def shutdown(self) -> None:
        self.client.shutdown()
