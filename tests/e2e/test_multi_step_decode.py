"""Multi-step decode (``num_scheduler_steps``): several greedy decode steps per call of the C++ CPU decode
step give the tokens, stops and finish reasons of one step at a time, and fall back to one step wherever the
host must see each token."""

from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams
from tokenmill.cli import _engine_kwargs, build_parser


def _prompts(n: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 20))]} for _ in range(n)]


def _count_calls(runner) -> dict:
    """Counts the runner's C++ calls: one-step (``decode_step``) and multi-step (``decode_step.steps``)."""
    step, calls = runner.decode_step, {"one": 0, "steps": []}

    class Counted:
        runs_steps = step.runs_steps

        def __call__(self, *args):
            calls["one"] += 1
            return step(*args)

        def steps(self, input_ids, positions, metadata, num_steps):
            calls["steps"].append(num_steps)
            return step.steps(input_ids, positions, metadata, num_steps)

    runner.decode_step = Counted()
    return calls


def _results(outputs) -> list[tuple[list[int], str, object]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outputs]


@pytest.mark.parametrize("arch, kwargs", [
    ("llama", dict(dtype="float32")),
    ("llama3", dict(dtype="bfloat16", quantization="int4", quantization_group_size=64, kv_cache_dtype="int8")),
])
def test_multi_step_greedy_generations_equal_the_python_forwards(arch, kwargs, checkpoint, make_llm, monkeypatch):
    prompts = _prompts(4)
    max_tokens = [13, 7, 10, 2]  # not multiples of the 4 steps; one request ends after its first decode
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    monkeypatch.setenv("TOKENMILL_NO_CPU_DECODE_STEP", "1")
    reference = make_llm(checkpoint(arch), block_size=4, **kwargs).generate(prompts, params, use_tqdm=False)
    monkeypatch.delenv("TOKENMILL_NO_CPU_DECODE_STEP")
    # A stop token in the middle of a burst: the 6th token of the first request (and the tokens after it dropped)
    stop_at = reference[0].outputs[0].token_ids[5]
    params[0] = SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True, stop_token_ids=[stop_at])
    expected = _results(make_llm(checkpoint(arch), block_size=4, **kwargs).generate(prompts, params, use_tqdm=False))
    first = reference[0].outputs[0].token_ids
    assert expected[0] == (first[:first.index(stop_at) + 1], "stop", stop_at)
    assert expected[1:] == _results(reference)[1:]

    llm = make_llm(checkpoint(arch), block_size=4, num_scheduler_steps=4, **kwargs)
    assert llm.engine.core.scheduler.config.num_scheduler_steps == 4
    calls = _count_calls(llm.engine.core.runner)
    assert _results(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert calls["steps"] and max(calls["steps"]) == 4, f"multi-step calls: {calls}"
    assert calls["one"] + len(calls["steps"]) < max(max_tokens) - 1, f"as many calls as tokens: {calls}"


def test_a_sampled_request_keeps_its_batch_at_one_step(checkpoint, make_llm):
    prompts = _prompts(3, seed=2)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)]
    expected = make_llm(checkpoint("llama"), dtype="float32").generate(prompts, params, use_tqdm=False)
    llm = make_llm(checkpoint("llama"), dtype="float32", num_scheduler_steps=4)
    calls = _count_calls(llm.engine.core.runner)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert _results(outputs) == _results(expected)
    assert [o.outputs[0].logprobs for o in outputs] == [o.outputs[0].logprobs for o in expected]
    assert not calls["steps"], "the logprobs request runs to the end: no step may skip the sampler"
    # without the logprobs request, the greedy one goes on alone, several steps a call, once the sampled one ends
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert calls["steps"]


def test_without_the_cpp_step_the_engine_runs_one_step_at_a_time(checkpoint, make_llm, monkeypatch):
    monkeypatch.setenv("TOKENMILL_NO_CPU_DECODE_STEP", "1")
    llm = make_llm(checkpoint("llama"), dtype="float32", num_scheduler_steps=4)
    assert llm.engine.core.scheduler.config.num_scheduler_steps == 1
    out = llm.generate(_prompts(1), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


def test_the_cli_flag_reaches_the_engine():
    args = build_parser().parse_args(["generate", "some-model", "--prompt", "hi", "--num-scheduler-steps", "8"])
    assert _engine_kwargs(args)["num_scheduler_steps"] == 8
    args = build_parser().parse_args(["bench", "compare", "some-model", "--variants", "a", "b",
                                      "--num-scheduler-steps", "8"])
    assert args.num_scheduler_steps == 8


def test_steps_past_the_allocated_blocks_are_refused(checkpoint, make_llm):
    """The C++ loop computes each step's slots from the block tables: a position past them is an error
    naming it, not a write outside the request's blocks."""
    import types

    import torch

    llm = make_llm(checkpoint("llama"), dtype="float32", block_size=4)
    step = llm.engine.core.runner.decode_step
    metadata = types.SimpleNamespace(decode_block_tables=torch.tensor([[0]]), decode_seq_lens=torch.tensor([4]))
    tokens = step.steps(torch.tensor([5]), torch.tensor([3]), metadata, 1)  # position 3: block 0 holds it
    assert tokens.shape == (1, 1) and tokens.dtype == torch.int64
    with pytest.raises(RuntimeError, match="row 0: position 4 is past its 1 blocks of 4 tokens"):
        step.steps(torch.tensor([5]), torch.tensor([3]), metadata, 2)


def test_a_stop_string_inside_a_burst_ends_the_request_there(checkpoint, make_llm):
    """Stop strings are found by the detokenizer after the burst: the text, the token ids (those after the
    token completing the stop string dropped) and the finish reason equal one step at a time."""
    prompts = _prompts(3, seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    one = make_llm(checkpoint("llama"), dtype="float32")
    texts = [o.outputs[0].text for o in one.generate(prompts, greedy, use_tqdm=False)]
    stops = [_clean_pair_near_middle(text) for text in texts]  # the random model's text has broken bytes too
    assert all(stops), texts
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[s]) for s in stops]
    expected = one.generate(prompts, params, use_tqdm=False)
    multi = make_llm(checkpoint("llama"), dtype="float32", num_scheduler_steps=4)
    calls = _count_calls(multi.engine.core.runner)
    outputs = multi.generate(prompts, params, use_tqdm=False)
    assert calls["steps"], "requests with stop strings run several steps a call"
    for got, want in zip(outputs, expected):
        assert want.outputs[0].finish_reason == "stop"
        assert (got.outputs[0].text, got.outputs[0].token_ids, got.outputs[0].finish_reason,
                got.outputs[0].stop_reason) == (want.outputs[0].text, want.outputs[0].token_ids, "stop",
                                                want.outputs[0].stop_reason)
    assert any(len(o.outputs[0].token_ids) % 4 != 1 for o in expected), "a stop string should fall inside a burst"


def _clean_pair_near_middle(text: str) -> str | None:
    """Two printable, whole characters of ``text`` nearest its middle (a stop string there), or None."""
    starts = [i for i in range(len(text) - 1) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2]]
    if not starts:
        return None
    start = min(starts, key=lambda i: abs(i - len(text) // 2))
    return text[start:start + 2]


def test_the_runner_refuses_steps_for_a_batch_that_needs_the_sampler(checkpoint, make_llm, monkeypatch):
    """A scheduler bug that gave a sampled request several steps would be an error, not wrong tokens."""
    llm = make_llm(checkpoint("llama"), dtype="float32", num_scheduler_steps=4)
    core = llm.engine.core
    core.add_request("sampled", [1, 5, 9, 14], SamplingParams(temperature=0.8, seed=1, max_tokens=8))
    core.step()  # its prompt
    monkeypatch.setattr(core.scheduler, "_num_steps_possible", lambda budget, max_seqs: 4)
    with pytest.raises(RuntimeError, match="a 4-step decode was scheduled for a batch that needs the host"):
        core.step()
    core.abort_requests(["sampled"])
