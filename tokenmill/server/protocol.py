"""Request bodies of the OpenAI API (with vLLM's extra sampling fields) and their SamplingParams.

Pydantic checks types (integers must be JSON integers: ``top_k: 2.5`` or ``2.0`` is a 400);
SamplingParams checks ranges and combinations, with a message naming the field. Unknown fields
are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tokenmill.errors import RequestError
from tokenmill.sampling_params import SamplingParams

Number = Union[StrictInt, StrictFloat]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[StrictStr, Number] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # vLLM's extra fields
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    no_repeat_ngram_size: StrictInt = 0
    bad_words: list[StrictStr] | None = None
    prompt_logprobs: StrictInt | None = None
    beam_width: StrictInt = 1
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0
    early_stopping: StrictBool | Literal["never"] = False

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, best_of: int | None) -> SamplingParams:
        """Raises RequestError (a ValueError) naming the bad field."""
        beam = self.use_beam_search or self.beam_width > 1
        width = self.beam_width if self.beam_width > 1 else (max(self.n, 2) if self.use_beam_search else 1)
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise RequestError(f"logit_bias keys must be token ids (digit strings), got {key!r}")
            bias[int(key)] = value
        return SamplingParams(
            temperature=(0.0 if beam else 1.0) if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            no_repeat_ngram_size=self.no_repeat_ngram_size, logit_bias=bias, bad_words=self.bad_words or [],
            prompt_logprobs=self.prompt_logprobs, n=self.n, best_of=best_of, logprobs=logprobs,
            beam_width=width, length_penalty=self.length_penalty, early_stopping=self.early_stopping)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: a string, a list of strings, a list of token ids, or a list of those lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs, self.best_of)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        top = self.top_logprobs if self.top_logprobs is not None else 0
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")
        return self._sampling_params(max_tokens, top if self.logprobs else None, None)
