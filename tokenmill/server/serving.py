"""POST /v1/completions and /v1/chat/completions: admission, generation, JSON and server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tokenmill.engine.async_llm import AsyncLLM, RequestTimeoutError
from tokenmill.engine.core_proc import EngineDeadError
from tokenmill.errors import RequestError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.app import APIError, ServerSettings
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest


def register_routes(app: FastAPI, engine: AsyncLLM, settings: ServerSettings) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        _check_model(body.model, settings)
        params = body.sampling_params()
        prompts = []
        if not body.prompts():
            raise RequestError("prompt is empty: give a string, a list of strings, or token ids")
        for prompt in body.prompts():
            if isinstance(prompt, str):
                if not prompt:
                    raise RequestError("prompt is empty: give some text or token ids")
                prompts.append(prompt)
            else:
                prompts.append({"prompt_token_ids": prompt})
        job = _start(engine, settings, "cmpl", prompts, params)
        api = _CompletionAPI(job, body, settings.model_name, engine)
        return await _respond(api, job, body.stream, raw, settings)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        _check_model(body.model, settings)
        params = body.sampling_params()
        if engine.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot chat")
        prompt = engine.encode_chat([m.as_template_message() for m in body.messages], body.add_generation_prompt)
        job = _start(engine, settings, "chatcmpl", [prompt], params)
        api = _ChatAPI(job, body, settings.model_name, engine)
        return await _respond(api, job, body.stream, raw, settings)


def _check_model(model: str | None, settings: ServerSettings) -> None:
    if model is not None and model != settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       "not_found_error", param="model", code="model_not_found")


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


def _start(engine: AsyncLLM, settings: ServerSettings, prefix: str, prompts: list, params: SamplingParams) -> _Job:
    capacity = engine.limits.max_num_seqs + settings.max_queued_requests
    if engine.num_in_flight + len(prompts) > capacity:
        raise APIError(503, f"the server is at capacity ({engine.num_in_flight} requests in flight, queue of "
                       f"{settings.max_queued_requests}); retry shortly", "server_overloaded",
                       code="queue_full", headers={"Retry-After": "1"})
    engine.check_health()
    job = _Job(prefix, len(prompts), params)
    added = []
    try:
        for request_id, prompt in zip(job.request_ids, prompts):
            engine.add_request(prompt, params, request_id, job.queue)
            added.append(request_id)
    except BaseException:
        for request_id in added:  # one bad prompt rejects the whole request
            engine.abort(request_id)
        raise
    return job


async def _respond(api, job: _Job, stream: bool, raw: Request, settings: ServerSettings):
    outputs = api.engine.outputs(job.queue, job.request_ids, settings.request_timeout)
    if stream:
        return StreamingResponse(_sse(api, outputs), media_type="text/event-stream",
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
    collector.result()  # re-raises timeouts and engine failures
    return api.full_response([final[rid] for rid in job.request_ids])


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def _sse(api, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, usage if asked, then [DONE]."""
    try:
        async with aclosing(outputs):
            async for output in outputs:
                for chunk in api.chunks(output):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        usage = api.usage_chunk()
        if usage is not None:
            yield f"data: {json.dumps(usage)}\n\n"
    except (RequestTimeoutError, EngineDeadError) as e:
        kind = "timeout_error" if isinstance(e, RequestTimeoutError) else "internal_server_error"
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'param': None, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"


class _StreamState:
    """What each choice has already sent: characters of text and tokens (for logprobs)."""

    def __init__(self):
        self.chars: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.finished: set[int] = set()
        self.roles_sent: set[int] = set()
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[tuple[str, int], int] = {}


class _BaseAPI:
    def __init__(self, job: _Job, body, model_name: str, engine: AsyncLLM):
        self.job, self.body, self.model_name, self.engine = job, body, model_name, engine
        self.state = _StreamState()
        self.n = job.params.n  # choices per prompt

    def _choice_index(self, output: RequestOutput, completion: CompletionOutput) -> int:
        return self.job.prompt_index(output.request_id) * self.n + completion.index

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        """The request's k most likely tokens at a position (the entry also holds the chosen token)."""
        return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:self.job.params.logprobs or 0]

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else str(token_id)

    def _usage(self, outputs: list[RequestOutput]) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunks(self, output: RequestOutput) -> list[dict]:
        """The stream chunks that this (cumulative) output adds."""
        s = self.state
        s.prompt_tokens[output.request_id] = len(output.prompt_token_ids)
        chunks = []
        for completion in output.outputs:
            index = self._choice_index(output, completion)
            if index in s.finished:
                continue
            s.completion_tokens[(output.request_id, completion.index)] = len(completion.token_ids)
            sent_chars, sent_tokens = s.chars.get(index, 0), s.tokens.get(index, 0)
            delta = completion.text[sent_chars:]
            new_tokens = len(completion.token_ids) - sent_tokens
            if not delta and not completion.finished and not (new_tokens and self.job.params.logprobs is not None):
                continue
            s.chars[index], s.tokens[index] = len(completion.text), len(completion.token_ids)
            if completion.finished:
                s.finished.add(index)
            chunks.extend(self._chunk(index, delta, completion, sent_tokens))
        return chunks

    def usage_chunk(self) -> dict | None:
        if not self.body.include_usage:
            return None
        prompt = sum(self.state.prompt_tokens.values())
        completion = sum(self.state.completion_tokens.values())
        return {"id": self.job.id, "object": self.chunk_object, "created": self.job.created, "model": self.model_name,
                "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion}}


class _CompletionAPI(_BaseAPI):
    chunk_object = "text_completion"

    def _logprobs(self, completion: CompletionOutput, start: int = 0, text_offset: int = 0) -> dict | None:
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(entry[token_id])
            top.append({self._token_text(t): lp for t, lp in self._top(entry)})
            offsets.append(text_offset)
            text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _choice(self, index: int, text: str, completion: CompletionOutput, logprobs,
                prompt_logprobs=None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                  "stop_reason": completion.stop_reason}
        if prompt_logprobs is not None:  # vLLM's extra: per prompt token, {token id: logprob}
            choice["prompt_logprobs"] = [None if e is None else {str(t): lp for t, lp in e.items()}
                                         for e in prompt_logprobs]
        return choice

    def _chunk(self, index: int, delta: str, completion: CompletionOutput, sent_tokens: int) -> list[dict]:
        logprobs = self._logprobs(completion, sent_tokens, self.state.chars.get(index, 0) - len(delta))
        return [{"id": self.job.id, "object": "text_completion", "created": self.job.created, "model": self.model_name,
                 "choices": [self._choice(index, delta, completion, logprobs)]}]

    def full_response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for output in outputs:
            for completion in output.outputs:
                prefix = (output.prompt or "") if self.body.echo else ""
                choices.append(self._choice(self._choice_index(output, completion), prefix + completion.text,
                                            completion, self._logprobs(completion), output.prompt_logprobs))
        return {"id": self.job.id, "object": "text_completion", "created": self.job.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(outputs)}


class _ChatAPI(_BaseAPI):
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, completion: CompletionOutput, start: int = 0) -> dict | None:
        if completion.logprobs is None:
            return None
        content = []
        for token_id, entry in zip(completion.token_ids[start:], completion.logprobs[start:]):
            text = self._token_text(token_id)
            top = [{"token": self._token_text(t), "logprob": lp, "bytes": list(self._token_text(t).encode())}
                   for t, lp in self._top(entry)]
            content.append({"token": text, "logprob": entry[token_id], "bytes": list(text.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def _chunk(self, index: int, delta: str, completion: CompletionOutput, sent_tokens: int) -> list[dict]:
        def chunk(delta_message: dict, finish_reason=None, stop_reason=None, logprobs=None) -> dict:
            return {"id": self.job.id, "object": "chat.completion.chunk", "created": self.job.created,
                    "model": self.model_name, "choices": [{"index": index, "delta": delta_message, "logprobs": logprobs,
                                                           "finish_reason": finish_reason,
                                                           "stop_reason": stop_reason}]}

        chunks = []
        if index not in self.state.roles_sent:
            self.state.roles_sent.add(index)
            chunks.append(chunk({"role": "assistant", "content": ""}))
        logprobs = self._logprobs(completion, sent_tokens)
        if delta or logprobs:
            chunks.append(chunk({"content": delta}, logprobs=logprobs))
        if completion.finished:
            chunks.append(chunk({}, completion.finish_reason, completion.stop_reason))
        return chunks

    def full_response(self, outputs: list[RequestOutput]) -> dict:
        output = outputs[0]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in output.outputs]
        return {"id": self.job.id, "object": "chat.completion", "created": self.job.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(outputs)}
