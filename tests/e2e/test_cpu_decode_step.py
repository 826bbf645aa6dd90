"""The C++ decode step (``runner/cpu_decode_step.py``) gives the Python forward's hidden states and
logits bit for bit (and their greedy tokens), on every decode step of real batched generations, for each weight form (float32/bf16 panels,
oneDNN-prepacked float32, dense float16, int8 panels, int4) and KV cache (float, int8); models and
caches it cannot run fall back to the Python forward."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.attention.layer import forward_context
from tokenmill.kernels import cpu_kernels

CASES = {
    "llama-fp32": ("llama", dict(dtype="float32")),
    "llama-fp32-onednn": ("llama", dict(dtype="float32", env={"TOKENMILL_NO_DENSE_PANELS": "1"})),
    "bias-fp32": ("llama_linear", dict(dtype="float32")),
    "llama-fp16-dense": ("llama", dict(dtype="float16")),
    "qwen2-bf16": ("qwen2", dict(dtype="bfloat16")),
    "mistral-int8kv": ("mistral", dict(dtype="float32", kv_cache_dtype="int8")),
    "llama3-int4": ("llama3", dict(dtype="float32", quantization="int4", quantization_group_size=32)),
    "llama3-bf16-int4-panels": ("llama3", dict(dtype="bfloat16", quantization="int4", quantization_group_size=64)),
    "llama3-bf16-int8-int8kv": ("llama3", dict(dtype="bfloat16", quantization="int8", kv_cache_dtype="int8")),
}

FLOAT_FORMS = {"llama-fp32": "panels", "bias-fp32": "panels", "qwen2-bf16": "panels", "llama-fp32-onednn": "packed"}


class _Checked:
    """Runs the Python forward and head before the C++ step on each decode step, records whether their
    hidden states and logits agree."""

    def __init__(self, runner):
        self.step, self.model, self.agreed = runner.decode_step, runner.model, []

    def __call__(self, input_ids, positions, metadata):
        with forward_context(metadata):
            expected = self.model(input_ids, positions)  # writes the same K/V the C++ step rewrites
        hidden, logits, greedy_tokens = self.step(input_ids, positions, metadata)
        assert logits is not None, "the C++ step should apply the LM head"
        same = torch.equal(hidden, expected) and torch.equal(logits, self.model.compute_logits(expected))
        same = same and torch.equal(greedy_tokens, logits.max(-1).indices)
        self.agreed.append((input_ids.shape[0], same))
        return hidden, logits, greedy_tokens


def _prompts(n: int = 5, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(2, 30))]} for _ in range(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_decode_step_equals_the_python_forward(case, checkpoint, make_llm, monkeypatch):
    arch, kwargs = CASES[case]
    kwargs = dict(kwargs)
    for name, value in kwargs.pop("env", {}).items():
        monkeypatch.setenv(name, value)
    llm = make_llm(checkpoint(arch), block_size=4, **kwargs)
    runner = llm.engine.core.runner
    if case in FLOAT_FORMS:  # the weight form under test
        dtype = getattr(torch, kwargs["dtype"])
        onednn = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        expected = FLOAT_FORMS[case] if cpu_kernels().dense_panels_available(dtype) else "packed" if onednn else "dense"
        gate_up = runner.model.model.layers[0].mlp.gate_up_proj
        assert gate_up.quant_method.decode_spec(gate_up, cpu_kernels()).kind == expected
    assert runner.decode_step is not None, f"{case}: the C++ decode step should have been built"
    checked = _Checked(runner)
    runner.decode_step = checked
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(_prompts(), params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outputs)
    batch_sizes = {rows for rows, _ in checked.agreed}
    assert len(checked.agreed) >= 11 and max(batch_sizes) > 1, f"decode steps seen: {checked.agreed}"
    disagreed = [rows for rows, same in checked.agreed if not same]
    assert not disagreed, f"{case}: C++ and Python hidden states or logits differ on steps of {disagreed} rows"


@pytest.mark.parametrize("arch, kwargs, why", [
    ("qwen3", dict(dtype="float32"), "q/k norms"),
    ("gpt2", dict(dtype="float32"), "not a Llama-family model"),
    ("mixtral", dict(dtype="float32"), "mixture-of-experts layers"),
    ("llama", dict(dtype="float32", kv_cache_dtype="fp8_e4m3"), "fp8 KV cache"),
    ("llama", dict(dtype="float32", attention_backend="torch"), "portable attention backend"),
])
def test_models_without_a_cpp_twin_run_the_python_forward(arch, kwargs, why, checkpoint, make_llm):
    llm = make_llm(checkpoint(arch), **kwargs)
    assert llm.engine.core.runner.decode_step is None, why
    out = llm.generate({"prompt_token_ids": [1, 5, 9, 14]}, SamplingParams(temperature=0, max_tokens=4,
                                                                           ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_the_switch_turns_the_cpp_step_off(checkpoint, make_llm, monkeypatch):
    monkeypatch.setenv("TOKENMILL_NO_CPU_DECODE_STEP", "1")
    assert make_llm(checkpoint("llama"), dtype="float32").engine.core.runner.decode_step is None


def test_cpu_decode_step_outputs_outlive_the_next_step(checkpoint, make_llm):
    """The step keeps its intermediate activations in buffers between steps (reallocated when the batch
    size changes); the hidden states and logits it returns are the caller's, untouched by later steps."""
    llm = make_llm(checkpoint("llama3"), block_size=4, dtype="bfloat16", quantization="int4",
                   quantization_group_size=64)
    runner = llm.engine.core.runner
    step, kept = runner.decode_step, []

    def keep(input_ids, positions, metadata):
        hidden, logits, tokens = step(input_ids, positions, metadata)
        kept.append((hidden, logits, hidden.clone(), logits.clone()))
        return hidden, logits, tokens

    runner.decode_step = keep
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 8, 5)]
    llm.generate(_prompts(3), params, use_tqdm=False)
    assert len(kept) >= 7 and len({hidden.shape[0] for hidden, *_ in kept}) > 1, "steps of several batch sizes"
    assert all(torch.equal(h, h0) and torch.equal(lg, lg0) for h, lg, h0, lg0 in kept), "a later step overwrote them"


def test_greedy_decode_steps_take_the_steps_argmax_without_the_sampler(checkpoint, make_llm, monkeypatch):
    """All-greedy steps without processors or logprobs use the C++ step's argmax; the tokens are those the
    sampler and the Python forward give, and the sampler still runs where a step needs it."""
    prompts = _prompts(4, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    monkeypatch.setenv("TOKENMILL_NO_CPU_DECODE_STEP", "1")
    reference = make_llm(checkpoint("llama"), block_size=4, dtype="float32").generate(prompts, greedy, use_tqdm=False)
    monkeypatch.delenv("TOKENMILL_NO_CPU_DECODE_STEP")
    llm = make_llm(checkpoint("llama"), block_size=4, dtype="float32")
    runner = llm.engine.core.runner
    assert runner.decode_step is not None
    sampled_rows = []
    sampler = runner.sampler
    runner.sampler = lambda logits, md: sampled_rows.append(logits.shape[0]) or sampler(logits, md)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert len(sampled_rows) <= 4, f"only prompt steps should sample, got {len(sampled_rows)} sampler calls"
    sampled_rows.clear()  # penalties (a processor) and logprobs need the sampler on decode steps too
    for params in (SamplingParams(temperature=0.0, max_tokens=6, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)):
        llm.generate(prompts[:1], params, use_tqdm=False)
    assert len(sampled_rows) == 12
