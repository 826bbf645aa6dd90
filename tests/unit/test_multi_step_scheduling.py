"""Multi-step scheduling (``num_scheduler_steps``) in the scheduler alone, with fabricated runner outputs."""

from __future__ import annotations

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.outputs import ModelRunnerOutput
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.kv_cache_manager import KVCacheManager
from tokenmill.scheduler.scheduler import Scheduler, runs_unattended

EOS = 2


def _make(num_steps=4, num_blocks=64, block_size=4, **cfg) -> Scheduler:
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(num_scheduler_steps=num_steps, **cfg), KVCacheManager(num_blocks, block_size))


def _add(s: Scheduler, rid: str, num_prompt: int = 5, max_tokens: int = 16, **params) -> Request:
    params.setdefault("temperature", 0.0)
    r = Request(rid, list(range(3, 3 + num_prompt)), SamplingParams(max_tokens=max_tokens, **params),
                frozenset({EOS}), max_tokens=max_tokens, seed=0)
    s.add_request(r)
    return r


def _step(s: Scheduler, tokens=None):
    """One schedule + update; every request gets ``tokens`` (default: 7s, one per step scheduled)."""
    so = s.schedule()
    out = {rid: list(tokens) if tokens is not None else [7] * so.num_steps for rid in so.num_scheduled_tokens}
    finished = s.update_from_output(so, ModelRunnerOutput(out))
    s.check_integrity()
    return so, finished


def test_greedy_decodes_take_several_steps_with_their_slots_allocated():
    s = _make(num_steps=4)
    a, b = _add(s, "a"), _add(s, "b")
    so, _ = _step(s)  # the prompts: one step
    assert so.num_steps == 1 and a.num_output_tokens == 1
    so = s.schedule()
    assert so.num_steps == 4 and so.num_scheduled_tokens == {"a": 1, "b": 1}
    for r in (a, b):  # slots for positions 5..8 (4 tokens per block): 3 blocks
        assert len(s.kv.block_ids(r.request_id)) == 3
        assert len(next(c for c in so.scheduled_cached_reqs if c.request_id == r.request_id).new_block_ids) == 1
    outs = s.update_from_output(so, ModelRunnerOutput({"a": [10, 11, 12, 13], "b": [20, 21, 22, 23]}))
    assert [o.new_token_ids for o in outs] == [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert a.output_token_ids == [7, 10, 11, 12, 13] and a.num_computed_tokens == 9 == a.num_tokens - 1
    s.check_integrity()
    so = s.schedule()  # the runner is sent the four new tokens
    assert next(c for c in so.scheduled_cached_reqs if c.request_id == "a").new_token_ids == [10, 11, 12, 13]


def test_a_stop_inside_the_steps_drops_the_tokens_after_it_and_frees_the_blocks():
    s = _make(num_steps=4)
    a = _add(s, "a")
    b = _add(s, "b", stop_token_ids=[31])
    _step(s)
    so = s.schedule()
    assert so.num_steps == 4
    outs = s.update_from_output(so, ModelRunnerOutput({"a": [10, EOS, 12, 13], "b": [30, 31, 32, 33]}))
    by_id = {o.request_id: o for o in outs}
    assert by_id["a"].new_token_ids == [10, EOS] and by_id["a"].finish_reason == "stop"
    assert by_id["b"].new_token_ids == [30, 31] and by_id["b"].stop_reason == 31
    assert a.output_token_ids == [7, 10, EOS] and b.output_token_ids == [7, 30, 31]
    s.check_integrity()
    assert s.kv.num_free_blocks == 64 and not s.running


def test_steps_stop_at_max_tokens():
    s = _make(num_steps=8)
    a = _add(s, "a", max_tokens=4)
    _step(s)  # 1 token
    so, outs = _step(s)
    assert so.num_steps == 3  # the 3 tokens a may still make
    assert outs[0].finish_reason == "length" and a.num_output_tokens == 4


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(logprobs=1), dict(prompt_logprobs=0),
                                    dict(repetition_penalty=1.2), dict(logit_bias={5: 1.0}),
                                    dict(no_repeat_ngram_size=2), dict(bad_words_token_ids=[[5]]),
                                    dict(min_tokens=3)])
def test_one_step_when_a_request_needs_the_host_between_tokens(params):
    s = _make(num_steps=4)
    _add(s, "plain")
    _add(s, "other", **params)
    for _ in range(3):
        so, _ = _step(s)
        assert so.num_steps == 1


def test_one_step_while_a_request_waits_and_when_lookahead_blocks_run_out():
    s = _make(num_steps=4, max_num_seqs=1)
    _add(s, "a")
    _add(s, "b")  # waits for a's seat: it must not wait for four steps of a at a time
    _step(s)
    so, _ = _step(s)
    assert so.num_steps == 1
    # 3 blocks of 4 tokens: a 9-token prompt takes 3 (its first decode fits), 4 steps ahead would need a fourth
    s = _make(num_steps=4, num_blocks=3)
    _add(s, "c", num_prompt=9)
    _step(s)
    so, _ = _step(s)
    assert so.num_steps == 1 and not s.waiting and s.num_preemptions == 0


def test_no_request_takes_blocks_ahead_unless_all_can():
    # 5 blocks of 4: two 7-token prompts take 2 each; 4 steps ahead (positions 7-10) need a third block each
    s = _make(num_steps=4, num_blocks=5)
    a, b = _add(s, "a", num_prompt=7), _add(s, "b", num_prompt=7)
    _step(s)
    held = {r.request_id: len(s.kv.block_ids(r.request_id)) for r in (a, b)}
    assert held == {"a": 2, "b": 2} and s.kv.num_free_blocks == 1
    so, _ = _step(s)
    assert so.num_steps == 1  # one free block, two needed: neither takes one ahead
    assert {r.request_id: len(s.kv.block_ids(r.request_id)) for r in (a, b)} == {"a": 2, "b": 2}


def test_single_step_scheduling_is_unchanged_by_default():
    s = _make(num_steps=1)
    _add(s, "a")
    for _ in range(3):
        so, _ = _step(s)
        assert so.num_steps == 1


def test_runs_unattended_needs_a_plain_greedy_decode():
    s = _make()
    r = _add(s, "a")
    assert not runs_unattended(r)  # its prompt is still to compute
    _step(s)
    assert runs_unattended(r)
    stop = _add(s, "stop", stop=["x"])  # stop strings: the detokenizer cuts a burst at one (tokens after dropped)
    _step(s)
    assert runs_unattended(stop)
    beam = Request("beam", [3, 4], SamplingParams(temperature=0.0, beam_width=2), frozenset({EOS}), max_tokens=4,
                   seed=0)
    beam.num_computed_tokens = beam.num_tokens - 1
    assert not runs_unattended(beam)  # beams rank log-probabilities between steps


def test_num_scheduler_steps_must_be_positive():
    with pytest.raises(ValueError, match="num_scheduler_steps must be a positive integer, got 0"):
        SchedulerConfig(num_scheduler_steps=0)
