"""The engine core in its own process (or, to measure what the split buys, a thread), behind pipes.

The core loop owns the model and never waits on HTTP, JSON or text: between steps it drains its
inbox (requests to add, abort or stop) and after each step it sends the step's token-level
outputs with a stats snapshot. When idle it blocks on the inbox. Messages (pickled):

    front end -> core:  ("add", request_id, prompt_token_ids, SamplingParams) | ("abort", ids)
                        | ("stop", ids) | ("shutdown",)
    core -> front end:  ("ready", EngineLimits) | ("outputs", [EngineCoreOutput], EngineStats)
                        | ("dead", message)        # the loop failed; it sends nothing more
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import traceback
from multiprocessing.connection import Connection

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineLimits, validate_request
from tokenmill.errors import TokenmillError
from tokenmill.logger import get_logger
from tokenmill.outputs import EngineCoreOutput
from tokenmill.sampling_params import SamplingParams

logger = get_logger(__name__)


class EngineDeadError(TokenmillError):
    """The engine core loop has failed; no request can be served."""


def _build_core(config: EngineConfig, tokenizer_eos: tuple[int, ...]):
    from tokenmill.engine.core import build_engine_core
    from tokenmill.config import resolve_device

    return build_engine_core(config, resolve_device(config.device), tokenizer_eos=tokenizer_eos)


def run_core(config: EngineConfig, tokenizer_eos: tuple[int, ...], inbox: Connection, outbox: Connection,
             num_threads: int | None) -> None:
    """Entry point of the core process (or thread): build the core, report ready, loop until shutdown."""
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
    try:
        core = _build_core(config, tokenizer_eos)
    except BaseException as e:  # noqa: BLE001 - reported to the front end, which raises it
        outbox.send(("dead", f"the engine failed to start: {e}"))
        return
    outbox.send(("ready", core.limits))
    try:
        _loop(core, inbox, outbox)
    except BaseException:  # noqa: BLE001 - the front end marks the engine dead and fails requests fast
        message = traceback.format_exc()
        logger.error("engine core loop failed:\n%s", message)
        try:
            outbox.send(("dead", message.strip().splitlines()[-1]))
        except OSError:
            pass
    finally:
        core.shutdown()


def run_core_process(*args) -> None:
    """Entry point of the core process: SIGINT (a terminal's Ctrl-C reaches the whole process group)
    is left to the server, which stops the core with a shutdown message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    run_core(*args)


def _loop(core, inbox: Connection, outbox: Connection) -> None:
    while True:
        if not core.has_unfinished_requests() and not _handle(core, inbox.recv(), outbox):
            return  # block while idle; shutdown
        while inbox.poll():
            if not _handle(core, inbox.recv(), outbox):
                return
        outputs = core.step() if core.has_unfinished_requests() else []
        outbox.send(("outputs", outputs, core.stats()))


def _handle(core, message: tuple, outbox: Connection) -> bool:
    """Applies one inbox message; False on shutdown."""
    kind = message[0]
    if kind == "add":
        _, request_id, token_ids, params = message
        try:
            core.add_request(request_id, token_ids, params)
        except TokenmillError as e:  # the front end validated it already; report rather than die
            logger.warning("request %s rejected by the core: %s", request_id, e)
            outbox.send(("outputs", [EngineCoreOutput(request_id, [], "abort")], core.stats()))
    elif kind == "abort":
        core.abort_requests(message[1])
    elif kind == "stop":
        core.stop_requests(message[1])
    elif kind == "shutdown":
        return False
    return True


class CoreClient:
    """The front end's handle on a core loop in another process (or a thread of this one)."""

    def __init__(self, config: EngineConfig, tokenizer_eos: tuple[int, ...], use_process: bool = True,
                 num_threads: int | None = None, start_timeout: float = 900.0):
        ctx = multiprocessing.get_context("spawn")
        self._inbox, core_outbox = ctx.Pipe(duplex=False)  # core -> front end
        core_inbox, self._outbox = ctx.Pipe(duplex=False)  # front end -> core
        args = (config, tokenizer_eos, core_inbox, core_outbox, num_threads or os.cpu_count())
        if use_process:
            # A daemonic process may not start children: over several ranks the core starts its workers
            # (it still exits when the front end goes away: its inbox closes).
            self._worker = ctx.Process(target=run_core_process, args=args, name="tokenmill-engine-core",
                                       daemon=config.tensor_parallel_size * config.pipeline_parallel_size == 1)
        else:
            self._worker = threading.Thread(target=run_core, args=args, name="tokenmill-engine-core", daemon=True)
        self._worker.start()
        self._send_lock = threading.Lock()
        if not self._inbox.poll(start_timeout):
            raise EngineDeadError(f"the engine did not start within {start_timeout:.0f} s")
        kind, payload = self._inbox.recv()
        if kind != "ready":
            raise EngineDeadError(payload)
        self.limits: EngineLimits = payload

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.limits)  # bad requests fail here, not in the core
        self._send(("add", request_id, list(prompt_token_ids), params))

    def abort_requests(self, request_ids) -> None:
        self._send(("abort", list(request_ids)))

    def stop_requests(self, request_ids) -> None:
        self._send(("stop", list(request_ids)))

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._outbox.send(message)
            except OSError as e:
                raise EngineDeadError(f"the engine core is gone: {e}") from e

    def recv(self) -> tuple:
        """The core's next message (blocking); ("dead", why) when the core has gone away."""
        try:
            return self._inbox.recv()
        except (EOFError, OSError) as e:
            return ("dead", f"the engine core exited ({type(e).__name__})")

    def reap(self, timeout: float = 5.0) -> None:
        """Waits for a core that has gone (or said it is dead) to exit, so that no zombie remains."""
        self._worker.join(timeout)
        if isinstance(self._worker, multiprocessing.process.BaseProcess) and self._worker.is_alive():
            self._worker.kill()
            self._worker.join(timeout)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Asks the core to stop (it reads the message between steps), then terminates it if it has not."""
        try:
            self._send(("shutdown",))
        except EngineDeadError:
            pass
        self._worker.join(timeout)
        if isinstance(self._worker, multiprocessing.process.BaseProcess) and self._worker.is_alive():
            self._worker.terminate()
            self.reap(timeout)
