"""Our model code against Hugging Face transformers on tiny random checkpoints of every architecture,
dense and mixture-of-experts."""

from __future__ import annotations

import pytest
import torch

from helpers.checkpoints import ARCHITECTURES, MOE_ARCHITECTURES, load_reference
from helpers.devices import TRITON_DEVICE
from helpers.parity import greedy_steps_match
from tokenmill import SamplingParams

PROMPTS = [[1, 17, 45, 99, 3, 250, 77], [1, 300], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                                  22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37]]


@pytest.mark.parametrize("mode", ["portable", "kernels", "triton"])
@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_prefill_and_decode_logits_match_reference(arch, mode, checkpoint, make_llm, monkeypatch):
    """"portable": pure PyTorch; "kernels": the C++ CPU kernels where they build; "triton": the
    Triton attention kernels (the CUDA default), in Triton's interpreter on CPU."""
    if mode == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed")
    if mode in ("portable", "triton"):
        monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    folder = checkpoint(arch)
    ref = load_reference(folder)
    # Small blocks: decodes cross block boundaries.
    backend = {"portable": "torch", "kernels": "auto", "triton": "triton"}[mode]
    llm = make_llm(folder, dtype="float32", block_size=4, attention_backend=backend,
                   device=TRITON_DEVICE if mode == "triton" else "cpu")
    core = llm.engine.core
    _, widths = greedy_steps_match(core, PROMPTS[0], 10, ref, label=arch)
    assert widths[0] == len(PROMPTS[0])
    assert not core.has_unfinished_requests()


@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_greedy_batch_matches_generate(arch, checkpoint, make_llm):
    folder = checkpoint(arch)
    ref = load_reference(folder)
    llm = make_llm(folder, dtype="float32")
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=16),
                           use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] == 2 else "length")


def test_sharded_safetensors_load_identically(checkpoint, make_llm):
    sharded = checkpoint("llama", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ref = load_reference(sharded)
    llm = make_llm(sharded, dtype="float32")
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    expected = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False)[0, 7:].tolist()
    assert out[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, checkpoint, make_llm):
    """A bf16/fp16 checkpoint loads as saved (bf16) or as float32 on CPU (fp16), and its logits stay close."""
    folder = checkpoint("qwen2", dtype=dtype)
    llm = make_llm(folder, dtype="auto")
    param_dtype = next(llm.engine.core.runner.model.parameters()).dtype
    assert param_dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    ref = load_reference(folder)  # float32 upcast of the same half-precision weights
    core = llm.engine.core
    core.add_request("r", PROMPTS[0], SamplingParams(temperature=0, max_tokens=1))
    so = core.scheduler.schedule()
    ours = core.runner.execute_logits(so)["r"]
    with torch.no_grad():
        theirs = ref(torch.tensor([PROMPTS[0]])).logits[0]
    tolerance = 0.1 if param_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(ours, theirs, atol=tolerance * theirs.abs().max().item(), rtol=0)
    core.abort_requests(["r"])
    llm.generate({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_penalties_and_ngram_bans_match_generate(arch, checkpoint, make_llm):
    """Greedy decoding with repetition_penalty and no_repeat_ngram_size, batched, equals transformers."""
    folder = checkpoint(arch)
    ref = load_reference(folder)
    llm = make_llm(folder, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, repetition_penalty=1.3,
                                no_repeat_ngram_size=2)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


def test_bad_words_and_logit_bias_steer_generation(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32")
    prompt = {"prompt_token_ids": PROMPTS[0]}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    banned = free[2]
    steered = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  bad_words_token_ids=[[banned]]), use_tqdm=False)[0].outputs[0]
    assert banned not in steered.token_ids and steered.token_ids[:2] == free[:2]
    forced = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={42: 100}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [42] * 5
    text = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    word = next(w for w in text.split() if w.isalpha())
    clean = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                            bad_words=[word]), use_tqdm=False)[0].outputs[0].text
    assert f" {word} " not in f" {clean} "


def test_logprobs_match_reference_distribution(checkpoint, make_llm):
    """Each generated token's logprob and its top alternatives equal log_softmax of the reference logits."""
    folder = checkpoint("llama")
    ref = load_reference(folder)
    llm = make_llm(folder, dtype="float32")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3), SamplingParams(max_tokens=6)]
    with_logprobs, without = llm.generate(prompts, params, use_tqdm=False)
    out = with_logprobs.outputs[0]
    assert without.outputs[0].logprobs is None and len(out.logprobs) == 6
    tokens = list(PROMPTS[0])
    total = 0.0
    for token, logprobs in zip(out.token_ids, out.logprobs):
        with torch.no_grad():
            expected = ref(torch.tensor([tokens])).logits[0, -1].log_softmax(-1)
        top = expected.topk(3)
        assert set(logprobs) == {token, *top.indices.tolist()}
        for t, value in logprobs.items():
            assert value == pytest.approx(expected[t].item(), abs=1e-4)
        total += logprobs[token]
        tokens.append(token)
    assert out.cumulative_logprob == pytest.approx(total)
    with pytest.raises(Exception, match=r"logprobs must be an integer in \[0, 20\]"):
        SamplingParams(logprobs=21)


@pytest.mark.parametrize("chunk", [2048, 5])
def test_prompt_logprobs_match_reference(chunk, checkpoint, make_llm):
    """Every prompt token's logprob (and top alternatives) equals log_softmax of the reference, also when the
    prompt is prefilled in 5-token chunks and when an identical prompt was cached before."""
    folder = checkpoint("qwen2")
    ref = load_reference(folder)
    llm = make_llm(folder, dtype="float32", max_num_batched_tokens=chunk, block_size=4)
    prompt = PROMPTS[2]
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2), use_tqdm=False)  # fills the cache
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, prompt_logprobs=2),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)  # row q predicts token q + 1
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        row = expected[position - 1]
        assert set(entry) == {prompt[position], *row.topk(2).indices.tolist()}
        for token, value in entry.items():
            assert value == pytest.approx(row[token].item(), abs=1e-4)
