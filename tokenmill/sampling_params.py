"""SamplingParams: the one contract for how a request is decoded, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokenmill.errors import RequestError, check_unicode


MAX_SAMPLES = 128
"""Upper bound of n and best_of: each sample is a sequence in the batch."""


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (names and meanings follow vLLM and the OpenAI API)."""

    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before softmax."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's, in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same output whatever else is in the batch."""
    max_tokens: int | None = 16
    """Most tokens to generate; None: up to the model's context length."""
    min_tokens: int = 0
    """Generate at least this many tokens before EOS or stop_token_ids may end the request."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string is not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (in addition to EOS); the token is kept in token_ids."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    skip_special_tokens: bool = True
    """Leave special tokens (BOS, EOS, ...) out of the text."""
    repetition_penalty: float = 1.0
    """Hugging Face semantics: logits of tokens already in the prompt or output are divided by it
    (multiplied when negative); > 1 discourages repetition; 1 = off."""
    presence_penalty: float = 0.0
    """OpenAI semantics, in [-2, 2]: subtracted once from every token that occurs in the output."""
    frequency_penalty: float = 0.0
    """OpenAI semantics, in [-2, 2]: subtracted per occurrence of the token in the output."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram (over prompt + output) of this size twice; 0 = off."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value in [-100, 100] added to its logit."""
    bad_words: list[str] = field(default_factory=list)
    """Words never to generate (each is tokenized with and without a leading space)."""
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    """Token sequences never to generate: the last token is banned after the others."""
    prompt_logprobs: int | None = None
    """Report, for every prompt token after the first, its log-probability given the tokens before it
    and the ``prompt_logprobs`` most likely alternatives (0-20); None = off. Such requests skip the
    prefix cache, since cached positions are never computed."""
    n: int = 1
    """How many samples of the prompt to return (with beam search: how many of the best beams);
    they share the prompt's KV blocks."""
    best_of: int | None = None
    """Generate this many samples (>= n) and return the n with the highest cumulative logprob."""
    logprobs: int | None = None
    """Report the log-probability of each generated token and of the ``logprobs`` most likely
    alternatives (0-20), from the model's distribution before any processing; None = off."""
    beam_width: int = 1
    """Beam search with this many beams when > 1 (Hugging Face ``num_beams``): the ``n`` best
    finished beams are returned, best first. Deterministic: temperature, top_p, top_k and min_p do
    not apply."""
    length_penalty: float = 1.0
    """Beam search: a finished beam's score is its cumulative logprob / (generated tokens ** length_penalty);
    > 0 favours longer outputs, < 0 shorter ones."""
    early_stopping: bool | str = False
    """Beam search (Hugging Face semantics): True stops once ``beam_width`` beams have finished; False
    stops when no running beam can still beat the finished ones at the current length (heuristic);
    ``"never"`` stops only when no running beam can beat them at any length."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if not _is_int(self.top_k) or (self.top_k < 0 and self.top_k != -1):
            raise RequestError(f"top_k must be an integer >= 0 (or -1 for all tokens), got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.seed is not None and not _is_int(self.seed):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise RequestError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}")
            check_unicode(s, "stop")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise RequestError(f"stop_token_ids must be non-negative integers, got {t!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            raise RequestError(f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        if self.best_of is not None and (not _is_int(self.best_of) or not self.n <= self.best_of <= MAX_SAMPLES):
            raise RequestError(f"best_of must be an integer in [n={self.n}, {MAX_SAMPLES}], got {self.best_of!r}")
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_SAMPLES:
            raise RequestError(f"beam_width must be an integer in [1, {MAX_SAMPLES}], got {self.beam_width!r}")
        _check_number("length_penalty", self.length_penalty, low=-100.0, high=100.0)
        if self.early_stopping not in (True, False, "never"):
            raise RequestError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        if self.use_beam_search:
            self._check_beam_search()
        elif (self.n > 1 or (self.best_of or 1) > 1) and self.temperature == 0:
            raise RequestError("n > 1 and best_of > 1 need sampling (temperature > 0): greedy samples are identical")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            raise RequestError(f"prompt_logprobs must be an integer in [0, 20] (or None), got {self.prompt_logprobs!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise RequestError(f"logprobs must be an integer in [0, 20] (or None), got {self.logprobs!r}")
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise RequestError(f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")
        if not isinstance(self.logit_bias, dict):
            raise RequestError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}")
        # Digit-string keys (JSON's) are token ids; only ASCII digits: "²".isdigit() and "５".isdigit() are true.
        self.logit_bias = {int(k) if isinstance(k, str) and re.fullmatch(r"[0-9]+", k) else k: v
                           for k, v in self.logit_bias.items()}
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            _check_number(f"logit_bias[{token}]", bias, low=-100.0, high=100.0)
        self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words or [])
        for word in self.bad_words:
            if not isinstance(word, str) or not word.strip():
                raise RequestError(f"bad_words must be non-empty strings, got {word!r}")
            check_unicode(word, "bad_words")
        self.bad_words_token_ids = [list(w) for w in self.bad_words_token_ids or []]
        for word in self.bad_words_token_ids:
            if not word or not all(_is_int(t) and t >= 0 for t in word):
                raise RequestError(f"bad_words_token_ids must be non-empty lists of token ids, got {word!r}")

    def _check_beam_search(self) -> None:
        """What beam search does not combine with, each with its own message."""
        if self.n > self.beam_width:
            raise RequestError(f"n ({self.n}) must not exceed beam_width ({self.beam_width}): "
                               "beam search returns the n best of its beams")
        if self.best_of is not None:
            raise RequestError("best_of does not apply to beam search: use beam_width")
        if self.temperature not in (0.0, 1.0):
            raise RequestError(f"beam search is deterministic: leave temperature at 0 or 1, got {self.temperature!r}")
        for name, value, default in (("top_p", self.top_p, 1.0), ("top_k", self.top_k, 0), ("min_p", self.min_p, 0.0)):
            if value != default:
                raise RequestError(f"{name} does not apply to beam search (deterministic); got {value!r}")
        if self.stop:
            raise RequestError("stop strings are not supported with beam search; use stop_token_ids")
        if self.logprobs is not None or self.prompt_logprobs is not None:
            raise RequestError("logprobs and prompt_logprobs are not supported with beam search; "
                               "each beam reports its cumulative_logprob")

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    @property
    def num_sequences(self) -> int:
        """Sequences one prompt runs as in the batch: its beams, or best_of (else n) samples."""
        return self.beam_width if self.use_beam_search else self.best_of or self.n

    @property
    def greedy(self) -> bool:
        """No random draw: temperature 0, or beam search (which ranks log-probabilities)."""
        return self.temperature == 0.0 or self.use_beam_search

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bounds = f"in {'(' if low_open else '['}{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(f"{name} must be {bounds}, got {value!r}")
