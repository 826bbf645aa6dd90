"""A request's tokens never depend on what else is in the batch, how prompts are chunked, or preemption."""

from __future__ import annotations

import random

import pytest

from tokenmill import SamplingParams

ARCH = "llama"


def _prompts(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 60))]} for _ in range(n)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_tokens(checkpoint):
    """Each prompt run alone on a roomy engine."""
    from tokenmill import LLM

    llm = LLM(str(checkpoint(ARCH)), kv_cache_memory="8MiB", device="cpu")
    return [_tokens(llm.generate(p, GREEDY, use_tqdm=False))[0] for p in _prompts()]


def test_together_matches_alone(checkpoint, make_llm, reference_tokens):
    llm = make_llm(checkpoint(ARCH))
    assert _tokens(llm.generate(_prompts(), GREEDY, use_tqdm=False)) == reference_tokens


def test_reversed_order(checkpoint, make_llm, reference_tokens):
    llm = make_llm(checkpoint(ARCH))
    outputs = llm.generate(list(reversed(_prompts())), GREEDY, use_tqdm=False)
    assert _tokens(outputs)[::-1] == reference_tokens


def test_small_chunked_prefill(checkpoint, make_llm, reference_tokens):
    llm = make_llm(checkpoint(ARCH), max_num_batched_tokens=7, block_size=4)
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert _tokens(outputs) == reference_tokens


def test_preemption_under_tiny_kv_budget(checkpoint, make_llm, reference_tokens):
    # 12 blocks of 4 tokens: the longest request alone needs ~21 blocks at the end... so give it room for one.
    longest = max(len(p["prompt_token_ids"]) for p in _prompts()) + GREEDY.max_tokens
    num_blocks = -(-longest // 4) + 2
    llm = make_llm(checkpoint(ARCH), block_size=4, kv_cache_memory=num_blocks * _bytes_per_block(checkpoint, 4))
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0, "the budget was meant to force preemption"
    assert _tokens(outputs) == reference_tokens


def test_preemption_without_prefix_caching(checkpoint, make_llm, reference_tokens):
    longest = max(len(p["prompt_token_ids"]) for p in _prompts()) + GREEDY.max_tokens
    num_blocks = -(-longest // 4) + 1
    llm = make_llm(checkpoint(ARCH), block_size=4, enable_prefix_caching=False, max_num_batched_tokens=16,
                   kv_cache_memory=num_blocks * _bytes_per_block(checkpoint, 4))
    outputs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert _tokens(outputs) == reference_tokens


def test_seeded_sampling_independent_of_batch(checkpoint, make_llm):
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i, max_tokens=20, ignore_eos=True)
               for i in range(len(_prompts()))]
    llm = make_llm(checkpoint(ARCH))
    together = _tokens(llm.generate(_prompts(), sampled, use_tqdm=False))
    alone = [_tokens(llm.generate(p, s, use_tqdm=False))[0] for p, s in zip(_prompts(), sampled)]
    assert together == alone
    tiny = make_llm(checkpoint(ARCH), block_size=4, max_num_batched_tokens=5,
                    kv_cache_memory=24 * _bytes_per_block(checkpoint, 4))
    assert _tokens(tiny.generate(_prompts()[::-1], sampled[::-1], use_tqdm=False))[::-1] == together
    assert len({tuple(t) for t in together}) == len(together)
    # A different seed gives a different sample.
    other = _tokens(llm.generate(_prompts()[0], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99,
                                                               max_tokens=20, ignore_eos=True), use_tqdm=False))[0]
    assert other != together[0]


def test_prefix_caching_reuses_blocks(checkpoint, make_llm):
    llm = make_llm(checkpoint(ARCH), block_size=4)
    core = llm.engine.core
    shared = [1] + list(range(10, 70))  # 61 tokens: 15 full blocks
    first = llm.generate({"prompt_token_ids": shared + [5, 6]}, GREEDY, use_tqdm=False)[0]
    computed_before = core.scheduler.num_computed_prompt_tokens
    second = llm.generate({"prompt_token_ids": shared + [7, 8, 9]}, GREEDY, use_tqdm=False)[0]
    computed_second = core.scheduler.num_computed_prompt_tokens - computed_before
    assert second.num_cached_tokens == 60
    assert computed_second == len(shared) + 3 - 60
    assert core.kv_cache_manager.prefix_cache_hit_rate > 0.4
    cold = make_llm(checkpoint(ARCH), block_size=4, enable_prefix_caching=False)
    expected = cold.generate({"prompt_token_ids": shared + [7, 8, 9]}, GREEDY, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == expected.outputs[0].token_ids
    assert first.num_cached_tokens == 0


def test_stop_conditions(checkpoint, make_llm):
    llm = make_llm(checkpoint(ARCH))
    prompt = _prompts()[0]
    free_run = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = free_run.token_ids[5]
    first = free_run.token_ids.index(stop_id)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free_run.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_id
    late = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, min_tokens=first + 2,
                                               stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= first + 2 and stop_id not in late.token_ids[:first + 2]


def test_text_prompts_stop_strings_and_chat(checkpoint, make_llm):
    llm = make_llm(checkpoint(ARCH))
    free = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert free.text == llm.tokenizer.decode(free.token_ids)
    stop = free.text[8:11]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    chat = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=5),
                    use_tqdm=False)[0]
    assert chat.prompt == "<|user|>hello</s><|assistant|>"
    assert chat.prompt_token_ids == llm.tokenizer.encode(chat.prompt, add_special_tokens=False)


def test_metrics_are_reported(checkpoint, make_llm):
    llm = make_llm(checkpoint(ARCH))
    out = llm.generate(_prompts()[:2], GREEDY, use_tqdm=False)
    for o in out:
        assert o.time_to_first_token > 0 and o.time_per_output_token > 0
        assert o.metrics.finished_time >= o.metrics.last_token_time >= o.metrics.first_token_time


def _bytes_per_block(checkpoint, block_size: int) -> int:
    import json

    cfg = json.loads((checkpoint(ARCH) / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4 * block_size


def test_eos_ids_from_generation_config(checkpoint, make_llm, tmp_path):
    """EOS ids come from the tokenizer and generation_config.json; either one ends a request."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(checkpoint(ARCH), folder)
    free = make_llm(folder).generate(_prompts()[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    extra_eos = next(t for t in free[3:] if t != 2)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, extra_eos]}))
    llm = make_llm(folder)
    assert set(llm.tokenizer.eos_token_ids) == {2, extra_eos}
    out = llm.generate(_prompts()[0], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:free.index(extra_eos) + 1] and out.finish_reason == "stop"
