"""Request bodies of the OpenAI API (with vLLM's extra sampling fields) and their SamplingParams.

Pydantic checks types (integers must be JSON integers: ``top_k: 2.5`` or ``2.0`` is a 400) and
that every string is valid Unicode (JSON's ``\ud800`` escapes can smuggle in lone surrogates);
SamplingParams checks ranges and combinations, with a message naming the field. OpenAI's own
fields keep OpenAI's ranges (``temperature`` in [0, 2]). Fields that would change the result but
are not supported here (``suffix``, ``tools``, ``response_format``, ...) are refused by name,
never silently ignored; fields that change nothing (``user``, ``metadata``, ``store``) are accepted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from tokenmill.errors import RequestError, check_unicode
from tokenmill.sampling_params import SamplingParams


def _valid_unicode(text: str) -> str:
    check_unicode(text, "the text")  # pydantic prefixes the field's name
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Number = Union[StrictInt, StrictFloat]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
MAX_OPENAI_TEMPERATURE = 2.0


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt = 1
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = 0.0
    frequency_penalty: Number | None = 0.0
    logit_bias: dict[Text, Number] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM's extra fields
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    no_repeat_ngram_size: StrictInt = 0
    bad_words: list[Text] | None = None
    prompt_logprobs: StrictInt | None = None
    beam_width: StrictInt = 1
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0
    early_stopping: StrictBool | Literal["never"] = False

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, best_of: int | None) -> SamplingParams:
        """Raises RequestError (a ValueError) naming the bad field."""
        beam = self.use_beam_search or self.beam_width > 1
        width = self.beam_width if self.beam_width > 1 else (max(self.n, 2) if self.use_beam_search else 1)
        if self.temperature is not None and not 0 <= self.temperature <= MAX_OPENAI_TEMPERATURE:
            raise RequestError(f"temperature must be in [0, {MAX_OPENAI_TEMPERATURE:g}] (OpenAI's range), "
                               f"got {self.temperature!r}")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]+", key.strip(), flags=re.ASCII):  # not str.isdigit(): "²" and "５" are digits
                raise RequestError(f"logit_bias keys must be token ids (strings of the digits 0-9), got {key!r}")
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
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    echo: StrictBool = False
    suffix: Text | None = None

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: a string, a list of strings, a list of token ids, or a list of those lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise RequestError("suffix is not supported: it needs fill-in-the-middle, which these models are "
                               "not served with; put all the text in prompt")
        params = self._sampling_params(self.max_tokens, self.logprobs, self.best_of)
        if self.echo and self.logprobs is not None:  # the echoed prompt tokens carry logprobs too
            params = dataclasses.replace(params, prompt_logprobs=max(self.logprobs, self.prompt_logprobs or 0))
        return params


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_template_message(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:  # templates that know names use them
            message["name"] = self.name
        return message


_UNSUPPORTED_CHAT_FIELDS = {
    # field: the values that ask for nothing beyond plain text generation
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,),
}


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(extra="allow")  # kept, so that unsupported OpenAI fields can be refused by name

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    chat_template: Text | None = None
    """vLLM's extra: a Jinja chat template for this request, rendered in the same sandbox."""

    def sampling_params(self) -> SamplingParams:
        for name, harmless in _UNSUPPORTED_CHAT_FIELDS.items():
            value = (self.model_extra or {}).get(name)
            if value not in harmless:
                raise RequestError(f"{name} is not supported by this server (only plain text generation); "
                                   f"leave it out, got {value!r}"[:300])
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        top = self.top_logprobs if self.top_logprobs is not None else 0
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise RequestError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        return self._sampling_params(max_tokens, top if self.logprobs else None, None)
