"""Data that crosses the engine's seams: scheduler -> runner -> scheduler -> user.

SchedulerOutput and ModelRunnerOutput are plain picklable dataclasses (they will cross process
boundaries). Running requests travel as diffs: only what changed since their last step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.scheduler.beam_search import BeamHypothesis


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must rebuild after preemption): everything in full."""

    request_id: str
    token_ids: list[int]
    """Prompt plus any outputs generated before a preemption."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    block_ids: list[int]
    num_computed_tokens: int
    num_output_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: what changed since its last scheduled step."""

    request_id: str
    new_token_ids: list[int]
    """Tokens appended to the request since it was last scheduled (normally the last sampled one)."""
    new_block_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int] | None = None
    """The whole block table, when copy-on-write replaced one of its blocks (new_block_ids is empty then)."""


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    """Request id -> number of tokens to compute this step."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    """Requests that ended (or were preempted) since the last step: the runner drops their state."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(source, destination) KV blocks to copy before the forward (copy-on-write of forked beams)."""
    kv_saves: list[tuple[int, bytes]] = field(default_factory=list)
    """(block id, prefix hash) of evicted cached blocks to save to the KV tiers, first of all."""
    kv_loads: list[tuple[int, object]] = field(default_factory=list)
    """(block id, the block's bytes from a KV tier) to write into the cache after the saves, before the forward."""
    num_steps: int = 1
    """Greedy decode steps to run back to back (multi-step scheduling; every request then decodes one token
    a step, its slots for all the steps allocated): the runner returns up to this many tokens per request."""

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, list[int]]
    """Request id -> tokens sampled this step: one each, or one per step of a multi-step decode."""
    logprobs: dict[str, list[tuple[list[int], list[float]]]] = field(default_factory=dict)
    """Request id -> per sampled token: (token ids, logprobs), the sampled token first (requests that ask only)."""
    prompt_logprobs: dict[str, tuple[int, list[tuple[list[int], list[float]]]]] = field(default_factory=dict)
    """Request id -> (position of the first prompt token covered, one (token ids, logprobs) per position)."""
    beam_candidates: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    """Beam-search request id -> its best next tokens and their processed log-probabilities, best first."""


@dataclass
class EngineCoreOutput:
    """One request's progress in one step, at the token level."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[list[int], list[float]]] | None = None
    prompt_logprobs: tuple[int, list[tuple[list[int], list[float]]]] | None = None
    beams: list[BeamHypothesis] | None = None
    """A finished beam search (request_id is the group's): the best n beams, best first."""
    num_cached_tokens: int = 0
    """Prompt tokens the request found in the prefix cache."""


@dataclass
class RequestMetrics:
    """Per-request times (time.perf_counter seconds), as the front end saw them."""

    arrival_time: float
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def time_per_output_token(self, num_output_tokens: int) -> float | None:
        if self.first_token_time is None or self.last_token_time is None or num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (num_output_tokens - 1)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """``"stop"`` (EOS, stop token or stop string), ``"length"`` (max_tokens or context), ``"abort"``."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended generation, if one did."""
    delta_text: str = ""
    """Text that became final in the latest step (what a stream sends next)."""
    logprobs: list[dict[int, float]] | None = None
    """With SamplingParams.logprobs: per generated token, {token id: logprob} of it and the top alternatives."""
    cumulative_logprob: float | None = None
    """With SamplingParams.logprobs: the sum of the generated tokens' logprobs."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt token
    {token id: logprob} of it (given the tokens before) and the top alternatives."""

    @property
    def time_to_first_token(self) -> float | None:
        return self.metrics.time_to_first_token

    @property
    def time_per_output_token(self) -> float | None:
        return self.metrics.time_per_output_token(len(self.outputs[0].token_ids))
