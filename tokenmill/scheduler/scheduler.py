"""Scheduler: continuous batching by letting each request's num_computed_tokens catch up with num_tokens.

Every step walks the running requests (oldest first), then the waiting ones, giving each
``min(num_tokens - num_computed_tokens, budget)`` tokens. Prompt chunks, decodes, prefix hits
and resumed requests need no special cases. When blocks run out, the newest running request is
preempted: its blocks are freed and it is recomputed later from its tokens (which, with prefix
caching, often finds its own blocks still cached).
"""

from __future__ import annotations

import time
from collections import deque

from tokenmill.config import SchedulerConfig
from tokenmill.outputs import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                               SchedulerOutput)
from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.kv_cache_manager import KVCacheManager


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()
        self._num_tokens_sent: dict[str, int] = {}  # tokens of each request the runner already holds
        self.num_preemptions = 0
        self.num_computed_prompt_tokens = 0

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> None:
        """Ends requests from outside the step (abort, stop string); frees their blocks at once."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.times.finished = time.perf_counter()
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
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            num_blocks_before = len(self.kv.block_ids(request.request_id))
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                num_scheduled[request.request_id] = num_new
                budget -= num_new
                index += 1
                cached_reqs.append(self._cached_data(request, num_blocks_before))
                continue
            break  # the request itself was preempted: nothing newer is left to schedule

        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            self.kv.record_prefix_query(request.num_tokens, num_cached)
            self.running.append(request)
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
                request.times.first_scheduled = time.perf_counter()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            self._num_tokens_sent[request.request_id] = request.num_tokens
            new_reqs.append(NewRequestData(
                request_id=request.request_id, token_ids=request.token_ids(0, request.num_tokens),
                num_prompt_tokens=request.num_prompt_tokens, sampling_params=request.sampling_params,
                seed=request.seed, block_ids=self.kv.block_ids(request.request_id),
                num_computed_tokens=num_cached, num_output_tokens=request.num_output_tokens))

        for request_id, n in num_scheduled.items():
            request = self.requests[request_id]
            self.num_computed_prompt_tokens += max(0, min(request.num_prompt_tokens - request.num_computed_tokens, n))
        finished, self._finished_req_ids = self._finished_req_ids, set()
        return SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()), finished)

    def _cached_data(self, request: Request, num_blocks_before: int) -> CachedRequestData:
        num_sent = self._num_tokens_sent[request.request_id]
        self._num_tokens_sent[request.request_id] = request.num_tokens
        return CachedRequestData(
            request_id=request.request_id, new_token_ids=request.token_ids(num_sent, request.num_tokens),
            new_block_ids=self.kv.block_ids(request.request_id)[num_blocks_before:],
            num_computed_tokens=request.num_computed_tokens)

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
        now = time.perf_counter()
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_tokens
            prompt_logprobs = runner_output.prompt_logprobs.get(request_id)
            if request.num_computed_tokens < request.num_tokens:
                self.kv.cache_blocks(request)  # a prompt chunk that is not the last: no token yet
                if prompt_logprobs is not None:
                    outputs.append(EngineCoreOutput(request_id, [], prompt_logprobs=prompt_logprobs))
                continue
            token = runner_output.sampled_token_ids[request_id][0]
            request.output_token_ids.append(token)
            request.times.first_token = request.times.first_token or now
            request.times.last_token = now
            self.kv.cache_blocks(request)
            status = self._check_stop(request, token)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            outputs.append(EngineCoreOutput(request_id, [token], status.finish_reason if status else None,
                                            request.stop_reason, runner_output.logprobs.get(request_id),
                                            prompt_logprobs))
        return outputs

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
