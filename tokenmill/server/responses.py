"""Response bodies of /v1/completions and /v1/chat/completions: whole, or as stream chunks.

A formatter sees one HTTP request's RequestOutputs (cumulative) and remembers what each choice
has already sent, so a stream carries only what is new.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams


class _TextOffsets:
    """Where each token's text starts, decoded incrementally as the text itself is (so a skipped
    BOS takes no room, and a character split over tokens counts once)."""

    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool):
        self.detokenizer = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, context_ids, SamplingParams(skip_special_tokens=skip_special_tokens))

    def feed(self, token_ids: list[int]) -> list[int]:
        """The offsets of these tokens, which follow those fed before."""
        offsets = []
        for token_id in token_ids:
            offsets.append(0 if self.detokenizer is None else len(self.detokenizer.text))
            if self.detokenizer is not None:
                self.detokenizer.update([token_id], finished=False)
        return offsets


class _StreamState:
    """What each choice has already sent: characters of text and tokens (for logprobs)."""

    def __init__(self):
        self.chars: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.finished: set[int] = set()
        self.started: set[int] = set()
        """Choices whose first chunk went out (the chat role, the echoed prompt)."""
        self.prompt_tokens: dict[str, int] = {}
        self.cached_tokens: dict[str, int] = {}
        """Per request: prompt tokens found already computed (prefix cache or KV tiers)."""
        self.completion_tokens: dict[tuple[str, int], int] = {}
        self.offsets: dict[int, _TextOffsets] = {}
        """Per choice: the text offsets of its tokens so far (legacy completions' logprobs)."""


class BaseAPI(ABC):
    chunk_object = ""
    heavy_chunks = False
    """Whether building chunks can take long (then it runs in a worker thread, off the event loop)."""

    def __init__(self, job, body, model_name: str, tokenizer):
        self.job, self.body, self.model_name, self.tokenizer = job, body, model_name, tokenizer
        self.state = _StreamState()
        self.n = job.params.n  # choices per prompt

    def _choice_index(self, output: RequestOutput, completion: CompletionOutput) -> int:
        return self.job.prompt_index(output.request_id) * self.n + completion.index

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        """The request's k most likely tokens at a position (the entry also holds the chosen token)."""
        return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:self.job.params.logprobs or 0]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else str(token_id)

    @staticmethod
    def _usage_body(prompt: int, completion: int, cached: int) -> dict:
        """OpenAI's usage object; ``cached_tokens``: prompt tokens that were not computed again."""
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _usage(self, outputs: list[RequestOutput]) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return self._usage_body(prompt, completion, sum(o.num_cached_tokens for o in outputs))

    def chunks(self, output: RequestOutput) -> list[dict]:
        """The stream chunks that this (cumulative) output adds."""
        s = self.state
        s.prompt_tokens[output.request_id] = len(output.prompt_token_ids)
        s.cached_tokens[output.request_id] = output.num_cached_tokens
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
            first = index not in s.started
            s.started.add(index)
            chunks.extend(self._chunk(index, output, completion, delta, sent_tokens, first))
        return chunks

    @abstractmethod
    def _chunk(self, index: int, output: RequestOutput, completion: CompletionOutput, delta: str,
               sent_tokens: int, first: bool) -> list[dict]:
        """The chunks for one choice's new text (``delta``), after ``sent_tokens`` tokens already
        sent; ``first``: nothing of this choice has been sent yet."""

    def usage_chunk(self) -> dict | None:
        if not self.body.include_usage:
            return None
        prompt = sum(self.state.prompt_tokens.values())
        completion = sum(self.state.completion_tokens.values())
        return {"id": self.job.id, "object": self.chunk_object, "created": self.job.created, "model": self.model_name,
                "choices": [], "usage": self._usage_body(prompt, completion, sum(self.state.cached_tokens.values()))}


class CompletionAPI(BaseAPI):
    """Legacy completions. With ``echo`` the prompt's text leads each choice's text, and with
    ``logprobs`` too, its tokens lead the logprobs (the first has none, as in OpenAI's API)."""

    chunk_object = "text_completion"

    def __init__(self, job, body, model_name: str, tokenizer):
        super().__init__(job, body, model_name, tokenizer)
        self.heavy_chunks = body.echo  # the first chunk decodes the whole prompt

    def _echo_text(self, output: RequestOutput) -> str:
        if not self.body.echo:
            return ""
        if output.prompt is not None:
            return output.prompt
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=self.job.params.skip_special_tokens)

    def _logprobs(self, index: int, output: RequestOutput, completion: CompletionOutput, start: int,
                  with_prompt: bool) -> dict | None:
        """OpenAI's logprobs object for choice ``index``'s tokens from ``start`` on (those before were
        sent already); ``with_prompt``: the prompt's tokens first."""
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        echoed = len(self._echo_text(output))
        if with_prompt:
            entries = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            prompt_offsets = _TextOffsets(self.tokenizer, [], self.job.params.skip_special_tokens)
            offsets.extend(min(o, echoed) for o in prompt_offsets.feed(output.prompt_token_ids))
            for token_id, entry in zip(output.prompt_token_ids, entries):
                tokens.append(self._token_text(token_id))
                token_logprobs.append(None if entry is None else entry[token_id])
                top.append(None if entry is None else {self._token_text(t): lp for t, lp in self._top(entry)})
        if index not in self.state.offsets:
            self.state.offsets[index] = _TextOffsets(self.tokenizer, output.prompt_token_ids,
                                                     self.job.params.skip_special_tokens)
        new_token_ids = completion.token_ids[start:]
        offsets.extend(echoed + o for o in self.state.offsets[index].feed(new_token_ids))
        for token_id, entry in zip(new_token_ids, completion.logprobs[start:]):
            tokens.append(self._token_text(token_id))
            token_logprobs.append(entry[token_id])
            top.append({self._token_text(t): lp for t, lp in self._top(entry)})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _choice(self, index: int, text: str, completion: CompletionOutput, logprobs,
                prompt_logprobs=None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": completion.finish_reason,
                  "stop_reason": completion.stop_reason}
        if prompt_logprobs is not None:  # vLLM's extra: per prompt token, {token id: logprob}
            choice["prompt_logprobs"] = [None if e is None else {str(t): lp for t, lp in e.items()}
                                         for e in prompt_logprobs]
        return choice

    def _chunk(self, index: int, output: RequestOutput, completion: CompletionOutput, delta: str,
               sent_tokens: int, first: bool) -> list[dict]:
        with_prompt = first and self.body.echo
        logprobs = self._logprobs(index, output, completion, sent_tokens, with_prompt)
        text = self._echo_text(output) + delta if with_prompt else delta
        return [{"id": self.job.id, "object": "text_completion", "created": self.job.created, "model": self.model_name,
                 "choices": [self._choice(index, text, completion, logprobs)]}]

    def full_response(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        asked_prompt_logprobs = self.body.prompt_logprobs is not None
        for output in outputs:
            echo = self._echo_text(output)
            for completion in output.outputs:
                index = self._choice_index(output, completion)
                logprobs = self._logprobs(index, output, completion, 0, self.body.echo)
                choices.append(self._choice(index, echo + completion.text,
                                            completion, logprobs,
                                            output.prompt_logprobs if asked_prompt_logprobs else None))
        return {"id": self.job.id, "object": "text_completion", "created": self.job.created, "model": self.model_name,
                "choices": choices, "usage": self._usage(outputs)}


class ChatAPI(BaseAPI):
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

    def _chunk(self, index: int, output: RequestOutput, completion: CompletionOutput, delta: str,
               sent_tokens: int, first: bool) -> list[dict]:
        def chunk(delta_message: dict, finish_reason=None, stop_reason=None, logprobs=None) -> dict:
            return {"id": self.job.id, "object": "chat.completion.chunk", "created": self.job.created,
                    "model": self.model_name, "choices": [{"index": index, "delta": delta_message, "logprobs": logprobs,
                                                           "finish_reason": finish_reason,
                                                           "stop_reason": stop_reason}]}

        chunks = []
        if first:
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
