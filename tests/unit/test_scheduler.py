"""The scheduler on its own, with fabricated runner outputs (no model, no torch)."""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.outputs import ModelRunnerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.kv_cache_manager import KVCacheManager
from tokenmill.scheduler.scheduler import Scheduler


def _make(num_blocks=64, block_size=4, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size))


def _add(s: Scheduler, rid: str, num_prompt: int, max_tokens: int = 4, **params) -> Request:
    r = Request(rid, list(range(3, 3 + num_prompt)), SamplingParams(max_tokens=max_tokens, **params),
                frozenset({2}), max_tokens=max_tokens, seed=0)
    s.add_request(r)
    return r


def _step(s: Scheduler, token: int = 7):
    so = s.schedule()
    finished = s.update_from_output(so, ModelRunnerOutput({rid: [token] for rid in so.num_scheduled_tokens}))
    s.check_integrity()
    return so, finished


def test_token_budget_chunks_prompts_and_mixes_decodes():
    s = _make(max_num_batched_tokens=10)
    _add(s, "a", 6)
    _add(s, "b", 13)
    so, _ = _step(s)
    assert so.num_scheduled_tokens == {"a": 6, "b": 4}  # b's prompt is chunked
    so, _ = _step(s)
    assert so.num_scheduled_tokens == {"a": 1, "b": 9}  # a decodes beside b's last chunk
    assert s.requests["a"].output_token_ids == [7, 7]
    assert s.requests["b"].output_token_ids == [7]  # only the last chunk yields a token


def test_max_num_seqs_limits_running():
    s = _make(max_num_seqs=2)
    for i in range(3):
        _add(s, str(i), 4)
    so, _ = _step(s)
    assert set(so.num_scheduled_tokens) == {"0", "1"} and len(s.waiting) == 1


def test_finishes_on_length_eos_and_stop_ids_and_frees_blocks():
    s = _make()
    _add(s, "len", 4, max_tokens=2, ignore_eos=True)  # EOS at its last token does not count
    _add(s, "stop", 4, max_tokens=8, stop_token_ids=[7])
    _add(s, "eos-min", 4, max_tokens=8, min_tokens=2)
    _, outs = _step(s)
    finished = {o.request_id: o.finish_reason for o in outs if o.finish_reason}
    assert finished == {"stop": "stop"}
    _, outs = _step(s, token=2)
    finished = {o.request_id: o.finish_reason for o in outs if o.finish_reason}
    assert finished == {"len": "length", "eos-min": "stop"}
    assert s.num_unfinished == 0 and s.kv.num_free_blocks == 64


def test_preempts_newest_and_recomputes_without_losing_requests():
    s = _make(num_blocks=6, block_size=4)
    _add(s, "old", 8, max_tokens=8)
    _add(s, "new", 8, max_tokens=8)
    _step(s)  # both prefilled: 2 blocks each (+ room)
    for _ in range(6):
        _step(s)
    assert s.num_preemptions >= 1
    seen_finished = set()
    for _ in range(40):
        if not s.num_unfinished:
            break
        _, outs = _step(s)
        seen_finished |= {o.request_id for o in outs if o.finish_reason}
    assert s.num_unfinished == 0 and s.kv.num_free_blocks == 6
    assert "new" in seen_finished or "old" in seen_finished


def test_preempted_request_resumes_with_its_outputs():
    s = _make(num_blocks=5, block_size=4)
    old = _add(s, "old", 8, max_tokens=8)
    new = _add(s, "new", 8, max_tokens=8)
    _step(s)
    while not new.num_preemptions:
        _step(s)
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    outputs_before = list(new.output_token_ids)
    so = s.schedule()
    if "new" in {r.request_id for r in so.scheduled_new_reqs}:
        resumed = next(r for r in so.scheduled_new_reqs if r.request_id == "new")
        assert resumed.token_ids == new.prompt_token_ids + outputs_before
    s.update_from_output(so, ModelRunnerOutput({rid: [7] for rid in so.num_scheduled_tokens}))
    while s.num_unfinished:
        _step(s)
    assert len(old.output_token_ids) == 8 and len(new.output_token_ids) == 8


def test_abort_frees_waiting_and_running():
    s = _make(max_num_seqs=1)
    _add(s, "run", 4)
    _add(s, "wait", 4)
    _step(s)
    s.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert s.num_unfinished == 0 and s.kv.num_free_blocks == 64
    so = s.schedule()
    assert so.finished_req_ids == {"run", "wait"} and so.is_empty


def test_prefix_cache_stats_count_admissions_not_attempts():
    s = _make(num_blocks=4, block_size=4)
    _add(s, "first", 12, max_tokens=4)  # 3 blocks, then 4: the whole pool until it finishes
    _add(s, "second", 8, max_tokens=2)  # 2 blocks: waits, never preempts or is preempted
    steps = 0
    while s.num_unfinished:
        _step(s)
        steps += 1
    assert steps > 4, "the second request was meant to wait several steps"
    assert s.num_preemptions == 0
    assert s.kv.num_queried_tokens == 12 + 8  # one lookup each, however many steps "second" waited


def test_copy_on_write_gives_the_writer_a_copy_and_sends_its_whole_table():
    s = _make(block_size=4)
    a = _add(s, "a", 6, max_tokens=8)
    _step(s)  # 6 prompt tokens computed: block 1 holds positions 4-5 of 8, a partial block
    # A fork (as beam search makes): b shares a's blocks and continues with another token.
    b = Request("b", a.prompt_token_ids, a.sampling_params, a.eos_token_ids, max_tokens=8, seed=0,
                output_token_ids=a.output_token_ids[:-1] + [9], num_computed_tokens=a.num_computed_tokens,
                status=RequestStatus.RUNNING)
    s.kv.fork(a, b)
    s.requests["b"] = b
    s.running.append(b)
    shared = s.kv.block_ids("a")
    so = s.schedule()
    # a comes first: its write would land in the shared partial block, so it writes to a copy.
    cached = {c.request_id: c for c in so.scheduled_cached_reqs}
    copy = cached["a"].block_ids[1]
    assert cached["a"].block_ids == [shared[0], copy] and copy not in shared and cached["a"].new_block_ids == []
    assert so.block_copies == [(shared[1], copy)]
    # b, the last holder, writes in place: no second copy.
    assert [n.block_ids for n in so.scheduled_new_reqs if n.request_id == "b"] == [shared]
    s.update_from_output(so, ModelRunnerOutput({rid: [7] for rid in so.num_scheduled_tokens}))
    s.check_integrity()
    assert s.kv.pool.blocks[shared[0]].ref_cnt == 2 and s.kv.pool.blocks[shared[1]].ref_cnt == 1


def _make_pipelined(num_blocks=64, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, 4), max_concurrent_batches=2)


def test_two_batches_in_flight_take_disjoint_halves_of_the_requests():
    """Pipeline parallelism: a second batch is scheduled before the first one's output comes back; it
    holds the other requests, and a request in flight is never scheduled twice."""
    s = _make_pipelined()
    for i in range(4):
        _add(s, str(i), 5, max_tokens=3)
    first = s.schedule()
    second = s.schedule()
    assert set(first.num_scheduled_tokens) == {"0", "1"} and set(second.num_scheduled_tokens) == {"2", "3"}
    assert s.schedule().num_scheduled_tokens == {}  # all four in flight: nothing to schedule
    s.update_from_output(first, ModelRunnerOutput({rid: [7] for rid in first.num_scheduled_tokens}))
    third = s.schedule()
    assert third.num_scheduled_tokens == {"0": 1, "1": 1}  # their decodes, while 2 and 3 are still out
    for so in (second, third):
        s.update_from_output(so, ModelRunnerOutput({rid: [7] for rid in so.num_scheduled_tokens}))
    assert [len(s.requests[str(i)].output_token_ids) for i in range(4)] == [2, 2, 1, 1]
    s.check_integrity()


def test_requests_in_flight_are_not_preempted_and_aborted_ones_drop_their_output():
    s = _make_pipelined(num_blocks=4)  # 16 slots: two 8-token prompts fill them
    _add(s, "a", 8, max_tokens=8, ignore_eos=True)
    _add(s, "b", 8, max_tokens=8, ignore_eos=True)
    first, second = s.schedule(), s.schedule()
    assert set(first.num_scheduled_tokens) == {"a"} and set(second.num_scheduled_tokens) == {"b"}
    s.update_from_output(first, ModelRunnerOutput({"a": [7]}))
    blocked = s.schedule()  # a's next token needs a third block; b holds the others and is in flight
    assert blocked.num_scheduled_tokens == {} and s.num_preemptions == 0
    s.update_from_output(second, ModelRunnerOutput({"b": [7]}))
    third = s.schedule()  # b's step is back: now it can give its blocks up
    assert third.num_scheduled_tokens == {"a": 1} and s.num_preemptions == 1
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # aborted while its step is in flight
    assert s.update_from_output(third, ModelRunnerOutput({"a": [9]})) == [] and "a" not in s.requests
    s.check_integrity()
