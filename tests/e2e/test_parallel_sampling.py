"""n > 1 and best_of: samples share the prompt's KV blocks, are distinct, seeded, and ranked."""

from __future__ import annotations

import pytest

from tokenmill import RequestError, SamplingParams
from tokenmill.engine.parallel_sampling import child_request_id

PROMPT = {"prompt_token_ids": [1] + list(range(20, 59))}  # 40 tokens: 2 full blocks of 16


def test_samples_share_prompt_blocks(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"))
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    engine.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True), "g")
    children = [child_request_id("g", i) for i in range(3)]
    for _ in range(3):
        engine.step()
    tables = [kv.req_blocks[c] for c in children]
    shared = tables[0][:2]
    assert all(t[:2] == shared for t in tables), "the prompt's full blocks are one copy for all samples"
    assert [b.ref_cnt for b in shared] == [3, 3]
    assert len({b.block_id for t in tables for b in t}) < sum(len(t) for t in tables)
    llm.engine.core.check_integrity()
    while engine.has_unfinished_requests():
        engine.step()


def test_n_distinct_samples_seeded_and_batch_independent(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"))
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPT, params, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in alone.outputs]
    assert len(set(samples)) == 4
    others = [{"prompt_token_ids": [1, 7, 8, 9]}, {"prompt_token_ids": [1] + list(range(100, 140))}]
    mixed = llm.generate(others[:1] + [PROMPT] + others[1:],
                         [SamplingParams(max_tokens=5), params, SamplingParams(temperature=0.5, max_tokens=9)],
                         use_tqdm=False)[1]
    assert [tuple(c.token_ids) for c in mixed.outputs] == samples


def test_best_of_returns_the_most_likely_samples(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"))
    common = dict(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    every = llm.generate(PROMPT, SamplingParams(n=4, logprobs=0, **common), use_tqdm=False)[0].outputs
    best = llm.generate(PROMPT, SamplingParams(n=2, best_of=4, **common), use_tqdm=False)[0].outputs
    ranked = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert best[0].logprobs is None and [c.index for c in best] == [0, 1]


def test_aborting_a_group_frees_every_block(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"))
    engine = llm.engine
    engine.add_request(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=50, ignore_eos=True), "g")
    for _ in range(4):
        engine.step()
    engine.abort_request("g")
    assert not engine.has_unfinished_requests()
    assert llm.engine.core.all_blocks_free()


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"n must be an integer in \[1, 128\]"),
    ({"n": 100000}, r"n must be an integer in \[1, 128\]"),
    ({"n": 3, "best_of": 2}, r"best_of must be an integer in \[n=3, 128\]"),
    ({"n": 2, "temperature": 0}, "need sampling"),
    ({"n": 1.5}, "n must be an integer"),
])
def test_invalid_n_and_best_of(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)
