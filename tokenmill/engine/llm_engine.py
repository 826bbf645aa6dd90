"""EngineFrontend and LLMEngine: text in, RequestOutputs out, over an engine core.

Tokenises prompts, runs steps, detokenises incrementally, applies stop strings, and assembles
per-request outputs with timings. ``LLM`` (offline) and ``tokenmill generate`` (streaming) use it.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Union

import torch

from tokenmill.config import EngineConfig, resolve_device
from tokenmill.engine.core import EngineCore, EngineLimits, build_engine_core, load_engine_model
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.parallel_sampling import SampleGroup, child_params, child_request_id
from tokenmill.engine.tokenizer import BaseTokenizer
from tokenmill.engine.tokenizer_loader import load_tokenizer
from tokenmill.errors import RequestError, check_unicode
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.outputs import EngineCoreOutput
from tokenmill.sampling_params import SamplingParams

PromptType = Union[str, dict]
"""A string, or ``{"prompt_token_ids": [...]}`` (optionally with ``"prompt"``)."""


@dataclass
class _Tracked:
    """What the front end knows of a request: everything it needs to build RequestOutputs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_cached_tokens: int = 0
    delta_text: str = ""
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def metrics(self, finished: bool) -> RequestMetrics:
        return RequestMetrics(self.arrival_time, self.first_token_time, self.last_token_time,
                              self.last_token_time if finished else None, self.num_cached_tokens)



class CoreClient(Protocol):
    """What the front end needs of an engine core, in this process or another."""

    @property
    def limits(self) -> EngineLimits: ...

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> object: ...

    def abort_requests(self, request_ids) -> None: ...

    def stop_requests(self, request_ids) -> None: ...


def frontend_tokenizer(config: EngineConfig) -> BaseTokenizer | None:
    if config.skip_tokenizer_init or (config.tokenizer is None and _is_named_shape(config.model)):
        return None
    return load_tokenizer(config.model, config.tokenizer)


class EngineFrontend:
    """Text in, RequestOutputs out, over any engine core: tokenises, groups n > 1 samples, turns
    the core's token-level outputs into per-request outputs (detokenised, stop strings applied).

    Thread-safe: a server tokenizes in worker threads and processes outputs in a reader thread.
    Tokenization runs outside the lock; only the bookkeeping is serialised.
    """

    def __init__(self, config: EngineConfig, tokenizer: BaseTokenizer | None, core: CoreClient):
        self.config = config
        self.tokenizer = tokenizer
        self.core = core
        self._tracked: dict[str, _Tracked] = {}
        self._groups: dict[str, SampleGroup] = {}
        self._group_of: dict[str, str] = {}  # child request id -> group id
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def encode_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt. A string is checked (valid Unicode, not obviously longer
        than the context) before it is tokenized; an empty one is encoded like any other (to BOS
        alone where the tokenizer adds one). RequestError for anything else."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give prompts as {'prompt_token_ids': [...]}")
            self._check_text(prompt, "prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise RequestError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
            return prompt.get("prompt"), list(ids)
        raise RequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> dict:
        """A conversation rendered with ``chat_template`` (default: the tokenizer's) and tokenized:
        ``{"prompt", "prompt_token_ids"}``."""
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer, so it cannot chat")
        for i, message in enumerate(messages):
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                check_unicode(message["content"], f"messages[{i}].content")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt, chat_template)
        self._check_text(text, "the rendered chat")
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def _check_text(self, text: str, what: str) -> None:
        """Valid Unicode, and not so long that it cannot fit the context: refused in O(len(text))
        time, before tokenizing (which costs far more)."""
        check_unicode(text, what)
        max_len = self.core.limits.max_model_len
        min_tokens = self.tokenizer.min_num_tokens(text)
        if min_tokens >= max_len:
            raise RequestError(f"{what} is too long: its {len(text)} characters make at least {min_tokens} tokens, "
                               f"and max_model_len is {max_len} (prompt + output)")

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None) -> str:
        """Tokenizes and queues a request; returns its id. RequestError (nothing queued) if it is bad."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self.encode_prompt(prompt)
        if params.bad_words:
            params = self._with_bad_word_ids(params)
        with self._lock:
            request_id = request_id if request_id is not None else str(next(self._ids))
            if params.use_beam_search:  # its n best beams come from one group of sequences in the core
                return self._add_single(request_id, text, token_ids, params)
            if params.n > 1 or (params.best_of or 1) > 1:
                return self._add_group(request_id, {"prompt": text, "prompt_token_ids": token_ids}, params)
            return self._add_single(request_id, text, token_ids, params)

    def _add_group(self, request_id: str, prompt: dict, params: SamplingParams) -> str:
        num_children = params.best_of or params.n
        # Later children wait for the first one's prefill so that they find its blocks in the prefix cache.
        share = self.config.cache.enable_prefix_caching and len(prompt["prompt_token_ids"]) > self.config.cache.block_size
        group = SampleGroup(request_id, params, prompt, pending=list(range(1, num_children)) if share else [])
        for index in [0] if share else range(num_children):
            self._add_child(group, index)
        self._groups[request_id] = group
        return request_id

    def _add_child(self, group: SampleGroup, index: int) -> None:
        child_id = child_request_id(group.request_id, index)
        self._add_single(child_id, group.prompt["prompt"], group.prompt["prompt_token_ids"],
                         child_params(group.params, index))
        self._group_of[child_id] = group.request_id

    def _add_single(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams) -> str:
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        self.core.add_request(request_id, token_ids, params)
        streams = self.tokenizer is not None and not params.use_beam_search  # beams are decoded when they finish
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params) if streams else None
        self._tracked[request_id] = _Tracked(request_id, text, list(token_ids), params, detokenizer)
        return request_id

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """A copy of ``params`` whose bad_words are token sequences (with and without a leading space)."""
        if self.tokenizer is None:
            raise RequestError("bad_words need a tokenizer; this model has none (use bad_words_token_ids)")
        sequences = [list(w) for w in params.bad_words_token_ids]
        for word in params.bad_words:
            for variant in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return dataclasses.replace(params, bad_words=[], bad_words_token_ids=sequences)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            group = self._groups.pop(request_id, None)
            ids = [child_request_id(request_id, i) for i in range(group.num_children)] if group else [request_id]
            self.core.abort_requests(ids)
            for child_id in ids:
                self._tracked.pop(child_id, None)
                self._group_of.pop(child_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked) or bool(self._groups)

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        """The outputs of requests that progressed (cumulative text); outputs of aborted requests are dropped."""
        with self._lock:
            return self._process_outputs(core_outputs)

    def _process_outputs(self, core_outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        results = []
        now = time.perf_counter()
        for out in core_outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:  # aborted while the core was stepping
                continue
            tracked.num_cached_tokens = out.num_cached_tokens
            if out.new_token_ids or out.beams is not None:
                tracked.output_token_ids.extend(out.new_token_ids)
                tracked.first_token_time = tracked.first_token_time or now
                tracked.last_token_time = now
            if out.beams is not None:
                results.append(self._beam_output(tracked, out))
                del self._tracked[out.request_id]
                continue
            if out.prompt_logprobs is not None:
                first, entries = out.prompt_logprobs
                if tracked.prompt_logprobs is None:
                    tracked.prompt_logprobs = [None] * len(tracked.prompt_token_ids)
                for offset, (ids, values) in enumerate(entries):  # by position: a recompute rewrites the same
                    tracked.prompt_logprobs[first + offset] = dict(zip(ids, values))
            if out.new_logprobs is not None:
                tracked.logprobs = (tracked.logprobs or []) + [dict(zip(ids, values)) for ids, values in out.new_logprobs]
            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            if tracked.detokenizer is not None:
                tracked.delta_text = tracked.detokenizer.update(out.new_token_ids, finish_reason is not None)
                if tracked.detokenizer.stop_string is not None:
                    unread = len(out.new_token_ids) - tracked.detokenizer.num_tokens_taken
                    if unread:  # a multi-step burst went past the stop string: its tokens after it are dropped
                        del tracked.output_token_ids[-unread:]
                    if finish_reason is None:
                        self.core.stop_requests([out.request_id])
                    finish_reason, stop_reason = "stop", tracked.detokenizer.stop_string
            output = self._make_output(tracked, finish_reason, stop_reason)
            if finish_reason is not None:
                del self._tracked[out.request_id]
            group_id = self._group_of.get(out.request_id)
            if group_id is None:
                results.append(output)
            else:
                results.append(self._update_group(group_id, out.request_id, output))
        return results

    def _update_group(self, group_id: str, child_id: str, output: RequestOutput) -> RequestOutput:
        group = self._groups[group_id]
        group.outputs[int(child_id.rsplit("#", 1)[1])] = output
        if group.pending:  # the first child has finished its prefill: its full prompt blocks are cached
            for index in group.pending:
                self._add_child(group, index)
            group.pending = []
        merged = group.merged_output()
        if group.finished:
            del self._groups[group_id]
            for index in range(group.num_children):
                self._group_of.pop(child_request_id(group_id, index), None)
        return merged

    def _beam_output(self, tracked: _Tracked, out: EngineCoreOutput) -> RequestOutput:
        """A finished beam search: its n best beams, best first."""
        skip = tracked.params.skip_special_tokens
        completions = []
        for index, beam in enumerate(out.beams):
            text = self.tokenizer.decode(beam.token_ids, skip_special_tokens=skip) if self.tokenizer else ""
            completions.append(CompletionOutput(
                index=index, text=text, token_ids=list(beam.token_ids), finish_reason=beam.finish_reason,
                stop_reason=beam.stop_reason, delta_text=text, cumulative_logprob=beam.cumulative_logprob))
        return RequestOutput(out.request_id, tracked.prompt, tracked.prompt_token_ids, completions, True,
                             tracked.metrics(True), tracked.num_cached_tokens)

    @staticmethod
    def _make_output(tracked: _Tracked, finish_reason: str | None, stop_reason: int | str | None) -> RequestOutput:
        det = tracked.detokenizer
        text = "" if det is None else det.text[:det.num_emitted_chars]
        completion = CompletionOutput(index=0, text=text, token_ids=list(tracked.output_token_ids),
                                      finish_reason=finish_reason, stop_reason=stop_reason,
                                      delta_text=tracked.delta_text, logprobs=tracked.logprobs,
                                      cumulative_logprob=None if tracked.logprobs is None else sum(
                                          lp[t] for lp, t in zip(tracked.logprobs, tracked.output_token_ids)))
        finished = finish_reason is not None
        return RequestOutput(tracked.request_id, tracked.prompt, tracked.prompt_token_ids, [completion], finished,
                             tracked.metrics(finished), tracked.num_cached_tokens, tracked.prompt_logprobs)


class LLMEngine(EngineFrontend):
    """The front end over an EngineCore in this process: ``step()`` runs one core step."""

    def __init__(self, config: EngineConfig):
        self.device = resolve_device(config.device)
        loaded = load_engine_model(config, self.device)  # the model first: its errors come before the tokenizer's
        try:
            tokenizer = frontend_tokenizer(config)
        except BaseException:
            if loaded[2] is not None:
                loaded[2].shutdown()
            raise
        core = build_engine_core(config, self.device, loaded, tokenizer.eos_token_ids if tokenizer else ())
        self.model_config = core.model_config
        super().__init__(config, tokenizer, core)

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs of requests that progressed (cumulative text)."""
        return self.process_outputs(self.core.step())


def _is_named_shape(model: str) -> bool:
    from pathlib import Path

    from tokenmill.models.shapes import SHAPES

    return model in SHAPES and not Path(model).exists()
