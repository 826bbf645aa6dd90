"""Request: the one mutable record of a request's progress; only the scheduler mutates it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Finished states sort after every unfinished one."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int
    """sampling_params.max_tokens, capped so that prompt + output fits in max_model_len."""
    seed: int
    """sampling_params.seed, or one drawn from the engine's seed when the request gave none."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (prompt and fed-back outputs)."""
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first scheduled."""
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""
    group: Any = None
    """The beam-search group (``scheduler.beam_search.BeamGroup``) this sequence is a beam of, if any;
    typed loosely so that this module imports nothing from the scheduler above it."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_id(self, index: int) -> int:
        """The index-th token of prompt + output."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the two lists."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
