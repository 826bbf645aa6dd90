"""Beam search inside the continuously batched engine.

A beam request is a *group* of ordinary sequences (``Request``s) that the scheduler runs side
by side with every other request. The group starts with one sequence, the prompt. Each step,
every live beam reports the top continuations of its (processed) log-probabilities; once all
have reported, ``BeamGroup.advance`` ranks ``beam score + token logprob`` over all beams and
picks the next beams, Hugging Face ``generate(num_beams=...)`` step for step:

- the ``num_candidates = max(2, 1 + #stop tokens) * beam_width`` best continuations are ranked;
- those that end (a stop token, or ``max_tokens`` reached) among the first ``beam_width`` become
  finished hypotheses, scored ``cumulative logprob / generated_len ** length_penalty``; the best
  ``beam_width`` hypotheses are kept;
- the best ``beam_width`` continuations that do not end become the next running beams;
- ``early_stopping`` decides when the group is done (see ``SamplingParams.early_stopping``).

The scheduler turns the chosen continuations into KV forks: a parent's first child continues in
the parent's own sequence, every further child is a new sequence that shares the parent's blocks
by reference count (the last, partial block is copied on its first write). Beams nobody continues
are dropped and their blocks freed. Nothing is recomputed. Scores are float32, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams

_NEG = -1.0e9


def beam_stop_ids(params: SamplingParams, eos_token_ids) -> frozenset[int]:
    """Tokens that finish a beam: EOS (unless ignore_eos) and stop_token_ids."""
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    return eos | frozenset(params.stop_token_ids)


def num_beam_candidates(params: SamplingParams, eos_token_ids) -> int:
    """How many continuations each beam reports (enough that beam_width of them never end)."""
    return max(2, 1 + len(beam_stop_ids(params, eos_token_ids))) * params.beam_width


@dataclass
class BeamHypothesis:
    """A finished beam."""

    token_ids: list[int]
    """Generated tokens, the stop token included."""
    cumulative_logprob: float
    score: float
    """cumulative_logprob / len(token_ids) ** length_penalty: what beams are ranked by."""
    finish_reason: str
    """"stop" (a stop token) or "length" (max_tokens)."""
    stop_reason: int | None


@dataclass
class Continuation:
    parent: Request
    token: int
    cumulative_logprob: float


class BeamGroup:
    """The beams of one request, their scores and its finished hypotheses."""

    def __init__(self, group_id: str, root: Request):
        params = root.sampling_params
        self.group_id = group_id
        self.params = params
        self.beam_width = params.beam_width
        self.max_tokens = root.max_tokens
        self.stop_ids = beam_stop_ids(params, root.eos_token_ids)
        self.num_candidates = num_beam_candidates(params, root.eos_token_ids)
        self.beams: list[Request] = [root]
        """Live beams, best first."""
        self.scores: dict[str, float] = {root.request_id: 0.0}
        self.finished: list[BeamHypothesis] = []
        """Best first, at most beam_width."""
        self.improvement_possible = True
        self.done = False
        self._reports: dict[str, tuple[list[int], list[float]]] = {}
        self._num_forks = 0

    def next_beam_id(self) -> str:
        self._num_forks += 1
        return f"{self.group_id}#beam{self._num_forks}"

    def report(self, beam: Request, token_ids: list[int], logprobs: list[float]) -> None:
        """A beam's top continuations: token ids and processed log-probabilities, best first."""
        self._reports[beam.request_id] = (token_ids, logprobs)

    def clear_reports(self) -> None:
        """Forgets this step's reports (the group was preempted: every beam reports again)."""
        self._reports = {}

    @property
    def ready(self) -> bool:
        """Every live beam has reported for the current length."""
        return len(self._reports) == len(self.beams)

    def advance(self) -> list[Continuation]:
        """Ranks the reported continuations; records finished beams; returns the next beams, best first.

        Sets ``done`` when the search is over (then the returned list is empty).
        """
        assert self.ready, "advance() before every beam reported"
        reports = [self._reports[b.request_id] for b in self.beams]
        self._reports = {}
        width = min(len(ids) for ids, _ in reports)
        running = torch.tensor([self.scores[b.request_id] for b in self.beams], dtype=torch.float32)
        logprobs = torch.tensor([lp[:width] for _, lp in reports], dtype=torch.float32)  # (beams, width)
        totals = (running[:, None] + logprobs).flatten()
        values, flat = totals.topk(min(self.num_candidates, totals.numel()))
        generated = self.beams[0].num_output_tokens + 1  # the same for every beam
        at_max = generated >= self.max_tokens
        candidates = []
        for value, index in zip(values.tolist(), flat.tolist()):
            beam, column = divmod(index, width)
            token = reports[beam][0][column]
            candidates.append((Continuation(self.beams[beam], token, value), at_max or token in self.stop_ids))

        # Finished: stopped continuations among the first beam_width, length-normalised.
        scale = generated ** self.params.length_penalty
        for cont, stopped in candidates[:self.beam_width]:
            if stopped:
                score = float(torch.tensor(cont.cumulative_logprob, dtype=torch.float32) / scale)
                stop = cont.token in self.stop_ids
                self.finished.append(BeamHypothesis(
                    cont.parent.output_token_ids + [cont.token], cont.cumulative_logprob, score,
                    "stop" if stop else "length", cont.token if cont.token in self.params.stop_token_ids else None))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.beam_width:]

        next_beams = [cont for cont, stopped in candidates if not stopped][:self.beam_width]
        self._update_done(next_beams, generated, all(stopped for _, stopped in candidates))
        return [] if self.done else next_beams

    def _update_done(self, next_beams: list[Continuation], generated: int, all_stopped: bool) -> None:
        full = len(self.finished) == self.beam_width
        if next_beams and full:
            lp = self.params.length_penalty
            length = self.max_tokens if self.params.early_stopping == "never" and lp > 0 else generated
            best_running = torch.tensor(next_beams[0].cumulative_logprob, dtype=torch.float32) / (length ** lp)
            self.improvement_possible &= bool(best_running > self.finished[-1].score)
        self.done = (not next_beams or all_stopped or not self.improvement_possible
                     or (full and self.params.early_stopping is True))

    def set_beams(self, beams: list[Request], scores: dict[str, float]) -> None:
        self.beams = beams
        self.scores = scores

    def results(self) -> list[BeamHypothesis]:
        """The best n finished beams, best first."""
        return self.finished[:self.params.n]
