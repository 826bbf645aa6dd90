"""POST /v1/completions and /v1/chat/completions: admission, generation, JSON and server-sent events.

Admission counts sequences (a prompt runs as n, best_of or beam_width of them), so the limits hold
what the batch will hold. Text work (chat templates, tokenisation) runs in the engine's worker
threads: the event loop stays free for other clients, /health and streams.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tokenmill.engine.async_llm import AsyncLLM, RequestTimeoutError, ServerShutdownError
from tokenmill.engine.core_proc import EngineDeadError
from tokenmill.errors import RequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.api_error import APIError
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.responses import ChatAPI, CompletionAPI
from tokenmill.server.settings import ServerSettings


def register_routes(app: FastAPI, engine: AsyncLLM, settings: ServerSettings) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, settings)
        params = body.sampling_params()
        prompts = body.prompts()
        if not prompts:
            raise RequestError("prompt is empty: give a string, a list of strings, or token ids")
        _admit(engine, settings, len(prompts), params)
        job = _Job("cmpl", len(prompts), params)
        await engine.add_requests([p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts],
                                  params, job.request_ids, job.queue)
        api = CompletionAPI(job, body, settings.model_name, engine.tokenizer)
        return await _respond(api, engine, job, body.stream, raw, settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, settings)
        params = body.sampling_params()
        if engine.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot chat")
        _admit(engine, settings, 1, params)
        prompt = await engine.run_blocking(engine.frontend.encode_chat, [m.as_template_message() for m in body.messages],
                                           body.add_generation_prompt, body.chat_template)
        _admit(engine, settings, 1, params)  # again: others may have been admitted while this one rendered
        job = _Job("chatcmpl", 1, params)
        await engine.add_requests([prompt], params, job.request_ids, job.queue)
        api = ChatAPI(job, body, settings.model_name, engine.tokenizer)
        return await _respond(api, engine, job, body.stream, raw, settings)


def _check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       "not_found_error", param="model", code="model_not_found")


def _admit(engine: AsyncLLM, settings: ServerSettings, num_prompts: int, params: SamplingParams) -> None:
    """Checks, before any text work, that the request's sequences fit: 400 if they never can, 503
    (retry later) if they cannot now."""
    engine.check_health()
    num_sequences = num_prompts * params.num_sequences
    capacity = engine.limits.max_num_seqs + settings.max_queued_requests
    if num_sequences > capacity:
        raise APIError(400, f"the request needs {num_sequences} sequences ({num_prompts} prompt(s) x "
                       f"{params.num_sequences} for n, best_of or beam_width), but this server holds at most "
                       f"{capacity} at once (max_num_seqs {engine.limits.max_num_seqs} + max_queued_requests "
                       f"{settings.max_queued_requests}); send fewer prompts or samples", "invalid_request_error",
                       code="request_too_large")
    if engine.num_in_flight + num_sequences > capacity:
        raise APIError(503, f"the server is at capacity ({engine.num_in_flight} of {capacity} sequences in flight); "
                       "retry shortly", "server_overloaded", code="queue_full", headers={"Retry-After": "1"})


class _Job:
    """One HTTP request's engine requests (one per prompt) and their shared output queue."""

    def __init__(self, prefix: str, num_prompts: int, params: SamplingParams):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.request_ids = [f"{self.id}-{i}" for i in range(num_prompts)]
        self.params = params
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())

    def prompt_index(self, request_id: str) -> int:
        return int(request_id.rsplit("-", 1)[1])


async def _respond(api, engine: AsyncLLM, job: _Job, stream: bool, raw: Request, settings: ServerSettings):
    outputs = engine.outputs(job.queue, job.request_ids, settings.request_timeout)
    if stream:
        return StreamingResponse(_sse(api, engine, outputs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    final: dict[str, RequestOutput] = {}

    async def collect():
        async with aclosing(outputs):
            async for output in outputs:
                if output.finished:
                    final[output.request_id] = output

    collector = asyncio.ensure_future(collect())
    disconnected = asyncio.ensure_future(_wait_for_disconnect(raw))
    await asyncio.wait({collector, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if not collector.done():  # the client left: stop generating for it now
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        return None
    disconnected.cancel()
    collector.result()  # re-raises timeouts, engine failures and shutdown
    return await engine.run_blocking(api.full_response, [final[rid] for rid in job.request_ids])


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


_STREAM_ERRORS = {RequestTimeoutError: ("timeout_error", "request_timeout"),
                  EngineDeadError: ("internal_server_error", "engine_dead"),
                  ServerShutdownError: ("server_shutting_down", "server_shutting_down")}


async def _sse(api, engine: AsyncLLM, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, usage if asked, then [DONE]. A failure
    after the 200 went out becomes an error event with the same type and code as the plain response."""
    try:
        async with aclosing(outputs):
            async for output in outputs:
                chunks = await engine.run_blocking(api.chunks, output) if api.heavy_chunks else api.chunks(output)
                for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        usage = api.usage_chunk()
        if usage is not None:
            yield f"data: {json.dumps(usage)}\n\n"
    except (RequestTimeoutError, EngineDeadError, ServerShutdownError) as e:
        kind, code = _STREAM_ERRORS[type(e)]
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'param': None, 'code': code}})}\n\n"
    yield "data: [DONE]\n\n"
