"""Beam search in the continuously batched engine against transformers generate(num_beams=...)."""

from __future__ import annotations

import pytest
import torch

from helpers.checkpoints import load_reference
from tokenmill import SamplingParams

PROMPTS = [[1, 5, 9, 33, 41, 17, 8], [1] + list(range(20, 45)), [1, 99, 98], [1, 250, 251, 7, 300, 12]]
EOS = 2  # the tiny checkpoints' eos_token_id; random weights emit it now and then
SETTINGS = [  # beam_width, length_penalty, early_stopping, no_repeat_ngram_size
    (3, 1.0, False, 0),
    (4, 0.5, True, 2),
    (2, 2.0, "never", 0),
    (3, -0.5, False, 3),
]


def reference_beams(ref, prompt, width, length_penalty, early_stopping, ngram, max_tokens):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                           max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                           no_repeat_ngram_size=ngram, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=EOS)
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def assert_same_beams(outputs, ref, settings, max_tokens):
    width, length_penalty, early_stopping, ngram = settings
    for prompt, output in zip(PROMPTS, outputs):
        sequences, scores = reference_beams(ref, prompt, width, length_penalty, early_stopping, ngram, max_tokens)
        assert len(output.outputs) == width
        for rank, (completion, sequence, score) in enumerate(zip(output.outputs, sequences, scores)):
            tokens = completion.token_ids
            # The reference pads shorter beams with pad (= EOS here) up to the longest.
            assert sequence[:len(tokens)] == tokens and set(sequence[len(tokens):]) <= {EOS}, \
                f"{settings} prompt {prompt} beam {rank}: {tokens} vs reference {sequence}"
            ours = completion.cumulative_logprob / len(tokens) ** length_penalty
            assert ours == pytest.approx(score, abs=1e-4), f"{settings} prompt {prompt} beam {rank} score"
            assert completion.finish_reason == ("stop" if tokens[-1] == EOS else "length")


@pytest.mark.parametrize("settings", SETTINGS)
def test_beam_search_matches_reference_in_one_batch_with_sampling(settings, checkpoint, make_llm):
    folder = checkpoint("llama")
    llm = make_llm(folder, dtype="float32", block_size=4)
    width, length_penalty, early_stopping, ngram = settings
    params = SamplingParams(beam_width=width, n=width, max_tokens=12, length_penalty=length_penalty,
                            early_stopping=early_stopping, no_repeat_ngram_size=ngram)
    others = [{"prompt_token_ids": [1, 40, 41, 42]}, {"prompt_token_ids": [1, 60]}]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS] + others,
                           [params] * len(PROMPTS) + [SamplingParams(temperature=0.8, seed=1, max_tokens=20),
                                                      SamplingParams(temperature=0, max_tokens=7)],
                           use_tqdm=False)
    assert_same_beams(outputs[:len(PROMPTS)], load_reference(folder), settings, 12)
    assert len(outputs[-1].outputs[0].token_ids) == 7


@pytest.mark.parametrize("settings", [SETTINGS[0], SETTINGS[3]])
def test_beam_search_matches_reference_under_preemption(settings, checkpoint, make_llm):
    folder = checkpoint("llama")
    # 16 blocks of 4 tokens (256 bytes a token): a group may need 3 beams x 5 blocks, so the four
    # groups preempt each other, and 8-token budgets recompute them in chunks.
    llm = make_llm(folder, dtype="float32", block_size=4, kv_cache_memory=16 * 4 * 256, max_num_batched_tokens=8)
    width, length_penalty, early_stopping, ngram = settings
    params = SamplingParams(beam_width=width, n=width, max_tokens=12, length_penalty=length_penalty,
                            early_stopping=early_stopping, no_repeat_ngram_size=ngram)
    short = [p[:8] for p in PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in short], params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0, "the KV budget should have forced preemption"
    ref = load_reference(folder)
    for prompt, output in zip(short, outputs):
        sequences, scores = reference_beams(ref, prompt, width, length_penalty, early_stopping, ngram, 12)
        assert [c.token_ids for c in output.outputs] == [s[:len(c.token_ids)] for c, s in zip(output.outputs, sequences)]
        assert [c.cumulative_logprob / len(c.token_ids) ** length_penalty for c in output.outputs] == \
            pytest.approx(scores, abs=1e-4)


def test_n_best_beams_best_first(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32")
    every = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(beam_width=4, n=4, max_tokens=10),
                         use_tqdm=False)[0].outputs
    best = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(beam_width=4, n=2, max_tokens=10),
                        use_tqdm=False)[0].outputs
    assert [c.token_ids for c in best] == [c.token_ids for c in every[:2]]
    assert [c.index for c in best] == [0, 1]
    scores = [c.cumulative_logprob / len(c.token_ids) for c in every]
    assert scores == sorted(scores, reverse=True)


def test_beams_share_blocks_and_copy_only_the_partial_block(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32", block_size=4)
    engine, core = llm.engine, llm.engine.core
    kv = core.kv_cache_manager
    prompt = {"prompt_token_ids": [1] + list(range(20, 30))}  # 11 tokens: 2 full blocks + a partial one
    engine.add_request(prompt, SamplingParams(beam_width=3, max_tokens=30, ignore_eos=True), "b")
    copies = []
    original_schedule = core.scheduler.schedule

    def schedule():
        out = original_schedule()
        copies.extend(out.block_copies)
        return out

    core.scheduler.schedule = schedule
    engine.step()  # prefill; the first beam step forks three beams from the prompt
    group = core.scheduler.groups["b"]
    assert len(group.beams) == 3
    tables = [kv.req_blocks[beam.request_id] for beam in group.beams]
    assert all(t[:2] == tables[0][:2] for t in tables), "the prompt's full blocks are one copy for all beams"
    assert [b.ref_cnt for b in tables[0][:2]] == [3, 3]
    assert tables[0][2].ref_cnt == 3, "the partial block is shared until a beam writes to it"
    engine.step()  # every beam writes its token: two copy the shared partial block, one keeps it
    assert len(copies) == 2
    tables = [kv.block_ids(beam.request_id) for beam in group.beams]
    core.check_integrity()
    for _ in range(6):
        engine.step()
    core.check_integrity()
    tables = [kv.req_blocks[beam.request_id] for beam in group.beams]
    distinct = {b.block_id for t in tables for b in t}
    assert len(distinct) < sum(len(t) for t in tables), "beams share blocks"
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert core.all_blocks_free()


def test_aborted_and_finished_beam_requests_free_every_block(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32", block_size=4)
    engine = llm.engine
    engine.add_request({"prompt_token_ids": PROMPTS[1]}, SamplingParams(beam_width=4, max_tokens=40, ignore_eos=True), "a")
    engine.add_request({"prompt_token_ids": PROMPTS[0]}, SamplingParams(beam_width=2, max_tokens=5), "f")
    finished = []
    for _ in range(8):
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["f"]
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()
    engine.core.check_integrity()
    assert engine.core.all_blocks_free()
