"""CUDA graphs of decode steps (``runner/cuda_graphs.py``).

On CPU (CI, under Triton's interpreter) and on a GPU: the static buffers, buckets and padding rows,
with ``RerunGraph`` (which runs the captured forward again) standing in for a CUDA graph: a
generation whose batch shrinks through padded buckets gives the tokens of the Python forward, and
padding rows never keep a stale slot or length. On a GPU: real graphs give the eager engine's
tokens and logprobs for each weight form and KV cache, and the models graphs cannot hold run eagerly.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers.devices import TRITON_DEVICE
from tokenmill import SamplingParams
from tokenmill.runner.cuda_graphs import CudaGraphDecodeStep, GraphLimits, RerunGraph, capture_sizes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _prompts(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 20))]} for _ in range(n)]


def _greedy(max_tokens: list[int]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]


def _tokens_and_logprobs(outputs):
    tokens = [o.outputs[0].token_ids for o in outputs]
    logprobs = [[next(iter(entry.values())) for entry in o.outputs[0].logprobs] for o in outputs]
    return tokens, logprobs


def test_capture_sizes_cover_every_batch_up_to_the_cap():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-3:] == [240, 248, 256] and len(capture_sizes(256)) == 35
    assert capture_sizes(1000)[-1] == 256


def test_graphs_are_built_only_on_cuda_with_the_triton_backend(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32", attention_backend="triton", device=TRITON_DEVICE)
    runner = llm.engine.core.runner
    if TRITON_DEVICE == "cpu":
        assert runner.decode_step is None  # no C++ step with the Triton backend, and no graphs
    limits = GraphLimits(max_num_seqs=4, max_model_len=64, block_size=16)
    assert CudaGraphDecodeStep.build(runner.model, "triton", limits, torch.device("cpu")) is None
    assert CudaGraphDecodeStep.build(runner.model, "triton", None, torch.device("cuda")) is None


class _Watched:
    """Records, after each step, the rows it used and whether the padding rows of its bucket write nowhere
    and attend to nothing."""

    def __init__(self, step: CudaGraphDecodeStep):
        self.step, self.seen = step, []

    def __call__(self, input_ids, positions, metadata):
        out = self.step(input_ids, positions, metadata)
        n = input_ids.shape[0]
        size = next(s for s in self.step.sizes if s >= n)
        padding_clean = bool((self.step.slot_mapping[n:size] == -1).all() and (self.step.seq_lens[n:size] == 0).all())
        self.seen.append((n, size, padding_clean))
        return out


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8_e4m3"])
def test_static_buffers_and_padded_buckets_give_the_python_forwards_tokens(kv_cache_dtype, checkpoint, make_llm):
    """Six requests of different lengths: the decode batch shrinks 6 -> 5 -> ... -> 1 through buckets of 8,
    4, 2 and 1 rows, so padding rows follow rows that held a live request a step before. Each KV cache form's
    write must skip the padding rows' slot -1."""
    folder = checkpoint("llama")
    options = dict(dtype="float32", attention_backend="triton", block_size=4, max_num_seqs=8, max_model_len=96,
                   device=TRITON_DEVICE, enforce_eager=True, kv_cache_dtype=kv_cache_dtype)
    prompts, params = _prompts(6), _greedy([3, 5, 6, 8, 9, 11])
    eager = make_llm(folder, **options)
    expected = _tokens_and_logprobs(eager.generate(prompts, params, use_tqdm=False))

    graphed = make_llm(folder, **options)
    runner = graphed.engine.core.runner
    step = CudaGraphDecodeStep(runner.model, GraphLimits(8, 96, 4), runner.device, graph_type=RerunGraph,
                               sizes=[1, 2, 4, 8])
    watched = _Watched(step)
    runner.decode_step = watched
    tokens, logprobs = _tokens_and_logprobs(graphed.generate(prompts, params, use_tqdm=False))
    assert tokens == expected[0]
    torch.testing.assert_close(torch.tensor(sum(logprobs, [])), torch.tensor(sum(expected[1], [])), atol=1e-4,
                               rtol=0)
    sizes = {(n, size) for n, size, _ in watched.seen}
    assert {(6, 8), (5, 8), (3, 4)} <= sizes and any(n == size for n, size in sizes), sizes
    assert all(clean for *_, clean in watched.seen), f"a padding row kept a stale slot or length: {watched.seen}"


def test_steps_outside_the_buckets_run_the_python_forward(checkpoint, make_llm):
    """More decodes than the largest bucket: the step answers None and the runner's Python forward serves it."""
    llm = make_llm(checkpoint("llama"), dtype="float32", attention_backend="triton", block_size=4, max_num_seqs=4,
                   max_model_len=64, device=TRITON_DEVICE, enforce_eager=True)
    runner = llm.engine.core.runner
    step = CudaGraphDecodeStep(runner.model, GraphLimits(4, 64, 4), runner.device, graph_type=RerunGraph,
                               sizes=[1, 2])
    answered = []

    def counted(input_ids, positions, metadata):
        out = step(input_ids, positions, metadata)
        answered.append((input_ids.shape[0], out is not None))
        return out

    runner.decode_step = counted
    out = llm.generate(_prompts(4), _greedy([4, 4, 4, 6]), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4, 4, 6]
    assert (4, False) in answered and (1, True) in answered, answered


GPU_CASES = {
    "llama-fp32": ("llama", dict(dtype="float32")),
    "llama-int8": ("llama3", dict(dtype="float32", quantization="int8")),
    "llama-int4": ("llama3", dict(dtype="float32", quantization="int4", quantization_group_size=32)),
    "llama-int8kv": ("mistral", dict(dtype="float32", kv_cache_dtype="int8")),
    "llama-fp8kv": ("llama", dict(dtype="float32", kv_cache_dtype="fp8_e4m3")),
    "qwen3-fp32": ("qwen3", dict(dtype="float32")),
    "gpt2-fp32": ("gpt2", dict(dtype="float32")),
}


@cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cuda_graphs_give_the_eager_engines_tokens(case, checkpoint, make_llm):
    arch, kwargs = GPU_CASES[case]
    options = dict(device="cuda", block_size=4, max_num_seqs=8, **kwargs)
    prompts, params = _prompts(6), _greedy([3, 5, 6, 8, 9, 11])
    eager = make_llm(checkpoint(arch), enforce_eager=True, **options)
    assert eager.engine.core.runner.decode_step is None
    expected = _tokens_and_logprobs(eager.generate(prompts, params, use_tqdm=False))
    graphed = make_llm(checkpoint(arch), **options)
    step = graphed.engine.core.runner.decode_step
    assert isinstance(step, CudaGraphDecodeStep), f"{case}: graphs should have been captured"
    assert step.sizes == [1, 2, 4, 8]
    tokens, logprobs = _tokens_and_logprobs(graphed.generate(prompts, params, use_tqdm=False))
    assert tokens == expected[0], case
    torch.testing.assert_close(torch.tensor(sum(logprobs, [])), torch.tensor(sum(expected[1], [])), atol=1e-3,
                               rtol=0)


@cuda
def test_cuda_graph_outputs_outlive_the_next_replay(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), device="cuda", dtype="bfloat16", block_size=4, max_num_seqs=4)
    runner = llm.engine.core.runner
    step, kept = runner.decode_step, []

    def keep(input_ids, positions, metadata):
        hidden, logits, tokens = step(input_ids, positions, metadata)
        kept.append((logits, logits.clone()))
        return hidden, logits, tokens

    runner.decode_step = keep
    llm.generate(_prompts(3), _greedy([3, 8, 5]), use_tqdm=False)
    assert len(kept) >= 7 and all(torch.equal(a, b) for a, b in kept)


@cuda
@pytest.mark.parametrize("arch, kwargs", [("mixtral", {}), ("llama", dict(attention_backend="torch"))])
def test_models_graphs_cannot_hold_run_eagerly_on_cuda(arch, kwargs, checkpoint, make_llm):
    llm = make_llm(checkpoint(arch), device="cuda", dtype="float32", **kwargs)
    assert llm.engine.core.runner.decode_step is None
    out = llm.generate(_prompts(2), _greedy([4, 4]), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
