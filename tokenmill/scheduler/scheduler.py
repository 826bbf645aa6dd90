"""Scheduler: continuous batching by letting each request's num_computed_tokens catch up with num_tokens.

Every step walks the running requests (oldest first), then the waiting ones, giving each
``min(num_tokens - num_computed_tokens, budget)`` tokens. Prompt chunks, decodes, prefix hits
and resumed requests need no special cases. When blocks run out, the newest running request is
preempted: its blocks are freed and it is recomputed later from its tokens (which, with prefix
caching, often finds its own blocks still cached).

Beam search (see ``beam_search.py``) adds *groups*: the beams of one request are ordinary requests
kept next to each other in the queues. A group is admitted and preempted as a unit, so that a
beam never waits for a sibling that cannot run; after each step, a group whose beams have all
reported advances, which forks, continues and drops beams.
"""

from __future__ import annotations

from collections import deque

from tokenmill.config import SchedulerConfig
from tokenmill.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                               SchedulerOutput)
from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.beam_search import BeamGroup
from tokenmill.scheduler.kv_cache_manager import KVCacheManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_concurrent_batches: int = 1):
        """``max_concurrent_batches`` > 1 (pipeline parallelism): that many batches may be in flight, each
        with its own requests; each batch takes about an equal share of the sequences."""
        self.config = config
        self.max_concurrent_batches = max_concurrent_batches
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()
        self._num_tokens_sent: dict[str, int] = {}  # tokens of each request the runner already holds
        self._in_flight: set[str] = set()  # scheduled in a step whose output has not come back yet
        self.groups: dict[str, BeamGroup] = {}
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request, group_id: str | None = None) -> None:
        """Queues a request; a beam-search request becomes the first beam of group ``group_id``."""
        for used in (request.request_id, group_id):
            if used is not None and (used in self.requests or used in self.groups):
                raise ValueError(f"request id {used!r} is already in use")
        if request.sampling_params.use_beam_search:
            group_id = group_id or request.request_id
            request.group = self.groups[group_id] = BeamGroup(group_id, request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Ends requests (or beam groups, by group id) from outside the step; frees their blocks at once."""
        for request_id in request_ids:
            group = self.groups.pop(request_id, None)
            for request in list(group.beams) if group else [self.requests.get(request_id)]:
                if request is None or request.status.finished:
                    continue
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request)
        self._finished_req_ids.add(request.request_id)
        self._num_tokens_sent.pop(request.request_id, None)
        del self.requests[request.request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: dict[str, NewRequestData] = {}
        cached_reqs: dict[str, CachedRequestData] = {}
        preempted = False
        max_seqs = self._max_seqs_per_batch()
        num_steps = self._num_steps_possible(budget, max_seqs)  # > 1: every running request, that many steps

        index = 0
        while index < len(self.running) and budget > 0 and len(num_scheduled) < max_seqs:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new == 0 or request.request_id in self._in_flight:  # a beam that reported, waiting for its
                index += 1  # siblings, or a request whose last step is still in the pipeline
                continue
            num_blocks_before = len(self.kv.block_ids(request.request_id))
            if num_steps > 1 and not self.kv.allocate_slots(request, num_steps):  # no room for the steps ahead:
                num_steps = 1  # one step (requests before keep the blocks they took: theirs for the next steps)
            while not self.kv.allocate_slots(request, num_new):
                unit, freed_budget = self._preempt_last(request, num_scheduled, new_reqs, cached_reqs)
                preempted = True
                if unit is None or request in unit:  # itself preempted, or all else in flight: wait
                    break
                budget += freed_budget
            else:
                num_scheduled[request.request_id] = num_new
                budget -= num_new
                index += 1
                if request.request_id in self._num_tokens_sent:
                    cached_reqs[request.request_id] = self._cached_data(request, num_blocks_before)
                else:  # a beam forked last step
                    new_reqs[request.request_id] = self._new_data(request)
                continue
            break  # nothing newer is left to schedule

        while self.waiting and budget > 0 and not preempted:
            unit = self._unit(self.waiting[0])  # a beam group's members are contiguous at the front
            if len(self.running) + len(unit) > self.config.max_num_seqs or (
                    num_scheduled and len(num_scheduled) + len(unit) > max_seqs):
                break
            admitted = self._admit(unit, budget)
            if admitted is None:
                break
            for request, num_new, num_hit, num_restored in admitted:
                self.waiting.popleft()
                self.kv.record_prefix_query(request.num_tokens, num_hit, num_restored)
                num_cached = num_hit + num_restored
                self.running.append(request)
                if request.status == RequestStatus.WAITING:
                    request.num_cached_tokens = num_cached
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = num_cached
                num_scheduled[request.request_id] = num_new
                budget -= num_new
                new_reqs[request.request_id] = self._new_data(request)

        for request_id, n in num_scheduled.items():
            request = self.requests[request_id]
            self.num_computed_prompt_tokens += max(0, min(request.num_prompt_tokens - request.num_computed_tokens, n))
        self._in_flight.update(num_scheduled)
        finished, self._finished_req_ids = self._finished_req_ids, set()
        kv_saves, kv_loads = self.kv.take_kv_transfers()
        if len(num_scheduled) < len(self.running):  # not everyone made it into the step after all
            num_steps = 1
        return SchedulerOutput(list(new_reqs.values()), list(cached_reqs.values()), num_scheduled,
                               sum(num_scheduled.values()), finished, self.kv.take_copies(), kv_saves, kv_loads,
                               num_steps)

    def _num_steps_possible(self, budget: int, max_seqs: int) -> int:
        """How many decode steps the next batch may run in one call (multi-step scheduling): up to
        num_scheduler_steps where every running request is a plain greedy decode (``runs_unattended``) that
        fits in this step and has that many tokens left to make, and nothing waits (it would wait for all
        the steps); else 1."""
        num_steps = self.config.num_scheduler_steps
        if num_steps == 1 or self.waiting or not self.running or len(self.running) > min(budget, max_seqs):
            return 1
        for request in self.running:
            if not runs_unattended(request) or request.request_id in self._in_flight:
                return 1
            num_steps = min(num_steps, request.max_tokens - request.num_output_tokens)
        if sum(self.kv.num_new_blocks(r, num_steps) for r in self.running) > self.kv.num_free_blocks:
            return 1  # no room for every request's steps ahead: no lookahead at all (none preempts for it)
        return max(num_steps, 1)

    def _max_seqs_per_batch(self) -> int:
        """With several batches in flight, each takes its share of the live sequences (so that the
        pipeline's stages all have work); one batch at a time takes up to max_num_seqs."""
        if self.max_concurrent_batches == 1:
            return self.config.max_num_seqs
        live = min(len(self.running) + len(self.waiting), self.config.max_num_seqs)
        return max(1, -(-live // self.max_concurrent_batches))

    @staticmethod
    def _unit(request: Request) -> list[Request]:
        """What is admitted and preempted together: a beam group's live beams, else the request."""
        return list(request.group.beams) if request.group is not None else [request]

    def _admit(self, unit: list[Request], budget: int) -> list[tuple[Request, int, int, int]] | None:
        """Allocates blocks for every request of ``unit`` (all or none): (request, tokens to compute, tokens
        found in the device pool, tokens restored from the KV tiers)."""
        share = budget // len(unit)  # beams split the budget so that the whole group starts this step
        if share == 0:
            return None
        admitted = []
        for request in unit:
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            in_tiers = self.kv.find_in_tiers(request, len(computed_blocks))  # then restored into new blocks
            num_restorable = len(in_tiers) * self.kv.block_size
            num_new = request.num_tokens - num_cached - num_restorable
            fits = self.config.enable_chunked_prefill or request.group is not None or num_new <= share
            if not fits or not self.kv.allocate_slots(request, num_restorable + min(num_new, share), computed_blocks):
                for done, *_ in admitted:  # roll back: the unit waits as a whole
                    self.kv.free(done)
                return None
            # A block that fails its check is recomputed, with the rest after it (the blocks allocated suffice).
            num_restored = self.kv.restore_from_tiers(request, len(computed_blocks), in_tiers) if in_tiers else 0
            num_new = min(request.num_tokens - num_cached - num_restored, share)
            admitted.append((request, num_new, num_cached, num_restored))
        return admitted

    def _new_data(self, request: Request) -> NewRequestData:
        self._num_tokens_sent[request.request_id] = request.num_tokens
        return NewRequestData(
            request_id=request.request_id, token_ids=request.token_ids(0, request.num_tokens),
            num_prompt_tokens=request.num_prompt_tokens, sampling_params=request.sampling_params,
            seed=request.seed, block_ids=self.kv.block_ids(request.request_id),
            num_computed_tokens=request.num_computed_tokens, num_output_tokens=request.num_output_tokens)

    def _cached_data(self, request: Request, num_blocks_before: int) -> CachedRequestData:
        num_sent = self._num_tokens_sent[request.request_id]
        self._num_tokens_sent[request.request_id] = request.num_tokens
        block_ids = self.kv.block_ids(request.request_id)
        replaced = request.request_id in self.kv.replaced  # copy-on-write swapped a block: send the table
        return CachedRequestData(
            request_id=request.request_id, new_token_ids=request.token_ids(num_sent, request.num_tokens),
            new_block_ids=[] if replaced else block_ids[num_blocks_before:],
            num_computed_tokens=request.num_computed_tokens, block_ids=block_ids if replaced else None)

    def _preempt_last(self, needy: Request, num_scheduled: dict[str, int], new_reqs: dict, cached_reqs: dict
                      ) -> tuple[list[Request] | None, int]:
        """Preempts the newest running unit with no step in flight (its blocks are being written: it cannot
        give them up), unscheduling what of it this step already scheduled. (None, 0): none to preempt, or
        only ``needy``'s own unit while other steps are in flight (it waits for them rather than recompute)."""
        for position in range(len(self.running) - 1, -1, -1):
            unit = self._unit(self.running[position])
            if not any(request.request_id in self._in_flight for request in unit):
                break
        else:
            return None, 0
        if needy in unit and self._in_flight:
            return None, 0
        for request in unit:
            self.running.remove(request)
        freed_budget = 0
        for request in reversed(unit):  # appendleft in reverse keeps the unit's order at the front
            freed_budget += num_scheduled.pop(request.request_id, 0)
            new_reqs.pop(request.request_id, None)
            cached_reqs.pop(request.request_id, None)
            self._preempt(request)
        if unit[0].group is not None:
            unit[0].group.clear_reports()  # every beam recomputes and reports again
        return unit, freed_budget

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_req_ids.add(request.request_id)  # the runner rebuilds it when it resumes
        self._num_tokens_sent.pop(request.request_id, None)
        self.waiting.appendleft(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advances progress, appends sampled tokens, checks stop conditions, frees finished requests."""
        outputs: list[EngineCoreOutput] = []
        reported: dict[str, BeamGroup] = {}
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self._in_flight.discard(request_id)
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or aborted while its step was in flight: the output is dropped
            request.num_computed_tokens += num_tokens
            prompt_logprobs = runner_output.prompt_logprobs.get(request_id)
            if request.num_computed_tokens < request.num_tokens:
                self.kv.cache_blocks(request)  # a prompt chunk that is not the last: no token yet
                if prompt_logprobs is not None:
                    outputs.append(EngineCoreOutput(request_id, [], prompt_logprobs=prompt_logprobs,
                                                    num_cached_tokens=request.num_cached_tokens))
                continue
            if request.group is not None:
                request.group.report(request, *runner_output.beam_candidates[request_id])
                self.kv.cache_blocks(request)
                reported[request.group.group_id] = request.group
                continue
            tokens, status = [], None  # one token a step; those after a stop (multi-step) are dropped
            for token in runner_output.sampled_token_ids[request_id]:
                if tokens:  # the token before went into this step as its input
                    request.num_computed_tokens += 1
                request.output_token_ids.append(token)
                tokens.append(token)
                status = self._check_stop(request, token)
                if status is not None:
                    break
            self.kv.cache_blocks(request)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            outputs.append(EngineCoreOutput(request_id, tokens, status.finish_reason if status else None,
                                            request.stop_reason, runner_output.logprobs.get(request_id),
                                            prompt_logprobs, num_cached_tokens=request.num_cached_tokens))
        for group in reported.values():
            if group.ready:
                outputs.extend(self._advance_group(group))
        return outputs

    def _advance_group(self, group: BeamGroup) -> list[EngineCoreOutput]:
        """One beam-search step: fork the chosen continuations, drop the rest; finish when done."""
        old = group.beams
        next_beams = group.advance()
        position = min(self.running.index(beam) for beam in old)
        self.running = [r for r in self.running if r.group is not group]
        if group.done:
            for beam in old:
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
            del self.groups[group.group_id]
            best = group.results()
            reason, stop_reason = (best[0].finish_reason, best[0].stop_reason) if best else ("length", None)
            return [EngineCoreOutput(group.group_id, [], reason, stop_reason, beams=best,
                                     num_cached_tokens=old[0].num_cached_tokens)]
        first_token: dict[str, int] = {}  # parent id -> the token it continues with itself
        beams, forks, scores = [], [], {}
        for cont in next_beams:  # best first
            parent = cont.parent
            if parent.request_id in first_token:  # a further child: a new sequence sharing the parent's blocks
                beam = self._fork(parent, cont.token)
                forks.append(beam)
            else:
                first_token[parent.request_id] = cont.token
                beam = parent
            beams.append(beam)
            scores[beam.request_id] = cont.cumulative_logprob
        for beam in old:  # after the forks copied the parents' tokens
            if beam.request_id in first_token:
                beam.output_token_ids.append(first_token[beam.request_id])
            else:  # no continuation kept: dropped
                self._finish(beam, RequestStatus.FINISHED_STOPPED)
        # Forks first: they copy a shared partial block before the parent writes into it in place.
        self.running[position:position] = forks + [b for b in beams if b not in forks]
        group.set_beams(beams, scores)
        return []

    def _fork(self, parent: Request, token: int) -> Request:
        child = Request(
            request_id=parent.group.next_beam_id(), prompt_token_ids=parent.prompt_token_ids,
            sampling_params=parent.sampling_params, eos_token_ids=parent.eos_token_ids,
            max_tokens=parent.max_tokens, seed=parent.seed, output_token_ids=parent.output_token_ids + [token],
            num_computed_tokens=parent.num_computed_tokens, num_cached_tokens=parent.num_cached_tokens,
            status=RequestStatus.RUNNING, group=parent.group)
        self.kv.fork(parent, child)
        self.requests[child.request_id] = child
        return child

    @staticmethod
    def _check_stop(request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for request in self.running:
            assert request.request_id in self.kv.req_blocks, f"running request {request.request_id} has no blocks"
        for request in self.waiting:
            assert request.request_id not in self.kv.req_blocks, f"waiting request {request.request_id} holds blocks"
        for group_id, group in self.groups.items():
            states = {beam.status for beam in group.beams}
            assert len(states) == 1, f"beam group {group_id}: beams in states {states}, not one unit"
            assert all(self.requests.get(b.request_id) is b for b in group.beams), f"beam group {group_id}: lost a beam"


def runs_unattended(request: Request) -> bool:
    """Whether the request's next tokens need nothing from the host between them: a decode (one token to
    compute) whose every token is its logits' argmax (temperature 0, no penalties, bias, bans, n-gram rule
    or min_tokens still to reach), with no logprobs and no beams. Such requests may run several steps in
    one call (``num_scheduler_steps``); a stop string inside a burst is found by the detokenizer, which
    drops the burst's tokens after it."""
    p = request.sampling_params
    return (request.num_tokens - request.num_computed_tokens == 1 and request.group is None
            and p.temperature == 0.0 and not p.use_beam_search and p.logprobs is None and p.prompt_logprobs is None
            and not p.uses_penalties and not p.logit_bias and not p.no_repeat_ngram_size
            and not p.bad_words and not p.bad_words_token_ids and request.num_output_tokens >= p.min_tokens)
