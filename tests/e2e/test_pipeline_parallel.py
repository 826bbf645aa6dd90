"""Pipeline parallelism (and with tensor and expert parallelism) on CPU: gloo, worker processes started by
the engine, 1 thread per rank.

Each stage holds its layers only; logits equal transformers' within 1e-4 and greedy tokens equal one
process's on dense, GPT-2, MoE and GPTQ checkpoints; the engine's features give the same outputs as
one process while two batches are in flight; an idle engine outlives the collective timeout; a
stage that dies fails the engine with its rank named."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import torch

from helpers.checkpoints import ARCHITECTURES, MOE_ARCHITECTURES
from helpers.gptq_checkpoints import GPTQSpec, gptq_test_config, make_gptq_checkpoint
from helpers.workloads import PROMPT, matches_reference_and_one_process, mixed_workload, tokens
from tokenmill import SamplingParams
from tokenmill.distributed.parallel_state import PipelineStage
from tokenmill.models.pipeline import MissingLayer


@pytest.mark.parametrize("arch, tp", [(arch, 1) for arch in ARCHITECTURES + ["llama_tp"] + MOE_ARCHITECTURES]
                         + [("llama_tp", 2), ("gpt2", 2)])
def test_stages_hold_their_layers_and_match_the_reference(arch, tp, checkpoint, make_llm):
    """Two stages, on every architecture (times two tensor-parallel ranks for llama_tp: vocabulary 381, tied
    head, 1 KV head; and for GPT-2)."""
    folder = checkpoint(arch)
    llm = make_llm(folder, dtype="float32", block_size=4, pipeline_parallel_size=2, tensor_parallel_size=tp)
    assert len(llm.engine.core.executor.processes) == 2 * tp - 1
    model = llm.engine.core.runner.model  # rank 0: stage 0 holds the embedding and the first half of the layers
    layers = model.transformer.h if arch == "gpt2" else model.model.layers
    held = [not isinstance(layer, MissingLayer) for layer in layers]
    half = -(-len(layers) // 2)  # qwen2_moe has 3 layers: 2 on the first stage, 1 on the second
    assert held == [True] * half + [False] * (len(layers) - half)
    assert model.lm_head is None and len(model.attention_layers()) == half
    matches_reference_and_one_process(llm, folder, make_llm, label=f"{arch} pp=2 tp={tp}")


def test_bfloat16_stages_equal_one_process(checkpoint, make_llm):
    """The stages agree on the KV cache's dtype (the model's, not the float32 of a later stage's first
    parameter) and hand on bf16 hidden states beside the float32 residual."""
    folder = checkpoint("llama3")
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, [1] + list(range(5, 40)))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = tokens(make_llm(folder, dtype="bfloat16").generate(prompts, params, use_tqdm=False))
    llm = make_llm(folder, dtype="bfloat16", pipeline_parallel_size=2)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ranks_sharing_one_gpu_equal_one_process(checkpoint, make_llm):
    """tp 2 x pp 2 with every rank on the one CUDA device (gloo hands tensors over through host memory):
    the tokens of one process on that device."""
    folder = checkpoint("llama_tp")
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, [1] + list(range(5, 40)))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = tokens(make_llm(folder, dtype="float32", device="cuda").generate(prompts, params, use_tqdm=False))
    llm = make_llm(folder, dtype="float32", device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected


def test_tensor_pipeline_and_expert_parallel_together(checkpoint, make_llm):
    """Qwen3-MoE over tp 2 x pp 2 with whole experts placed on each stage's two ranks."""
    folder = checkpoint("qwen3_moe")
    llm = make_llm(folder, dtype="float32", block_size=4, pipeline_parallel_size=2, tensor_parallel_size=2,
                   enable_expert_parallel=True)
    matches_reference_and_one_process(llm, folder, make_llm, label="qwen3_moe tp=2 pp=2 ep")


def test_gptq_checkpoint_over_two_stages(checkpoint, make_llm, tmp_path):
    reference = make_gptq_checkpoint(tmp_path / "gptq", gptq_test_config("llama"), GPTQSpec(bits=4, group_size=16))
    llm = make_llm(tmp_path / "gptq", dtype="float32", block_size=4, pipeline_parallel_size=2)
    matches_reference_and_one_process(llm, tmp_path / "gptq", make_llm, reference=reference, label="gptq pp=2")


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_features_with_two_batches_in_flight_equal_one_process(tp, checkpoint, make_llm):
    """Chunked prefill (16 tokens per step), prefix hits, preemption (room for ~2 requests), seeded
    sampling and beam search, all in one workload, while the two stages each run a batch."""
    folder = checkpoint("llama_tp")
    options = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory=2 * 2 * 1 * 8 * 4 * 4 * 40)
    prompts, params = mixed_workload()
    expected = tokens(make_llm(folder, **options).generate(prompts, params, use_tqdm=False))
    options["kv_cache_memory"] //= 2  # each stage holds one of the two layers: the same number of blocks
    llm = make_llm(folder, pipeline_parallel_size=2, tensor_parallel_size=tp, **options)
    core = llm.engine.core
    overlaps = []  # for each batch started while another was in flight: whether they share a request

    def start(so, execute_async=core.runner.execute_async):
        out = {rid for batch, _ in core._in_flight for rid in batch.num_scheduled_tokens}
        if out and so.num_scheduled_tokens:
            overlaps.append(bool(out & set(so.num_scheduled_tokens)))
        return execute_async(so)

    core.runner.execute_async = start
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    stats = core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert core.max_batches_in_flight == 2 and len(overlaps) > 10 and not any(overlaps)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_an_idle_engine_outlives_the_collective_timeout(tp, pp, checkpoint):
    """Workers wait for their next step without a time limit: a server idle for longer than
    distributed_timeout_s still serves."""
    from tokenmill.llm import LLM, engine_config

    config = dataclasses.replace(engine_config(str(checkpoint("llama")), dtype="float32", device="cpu",
                                               kv_cache_memory="8MiB", tensor_parallel_size=tp,
                                               pipeline_parallel_size=pp), distributed_timeout_s=5)
    llm = LLM.from_engine_config(config)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        first = tokens(llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False))
        time.sleep(8)  # the timeout (5 s) also bounds the workers' start-up: importing torch alone takes 2-3 s
        assert all(p.is_alive() for p in llm.engine.core.executor.processes)
        assert tokens(llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)) == first
    finally:
        llm.shutdown()


def test_a_stage_that_dies_fails_the_engine_naming_its_rank(checkpoint):
    from tokenmill.llm import LLM

    llm = LLM(str(checkpoint("llama")), dtype="float32", device="cpu", kv_cache_memory="8MiB",
              pipeline_parallel_size=2)
    try:
        worker = llm.engine.core.executor.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"distributed worker rank 1 \(exit code -9\) died"):
            llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - started < 30
    finally:
        llm.shutdown()


def test_layers_split_evenly_over_stages_and_every_stage_needs_one():
    assert [PipelineStage(r, 4).layer_range(14) for r in range(4)] == [(0, 4), (4, 8), (8, 11), (11, 14)]
    assert PipelineStage(0, 4).max_layers(14) == 4
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 exceeds the model's 2 layers"):
        PipelineStage(0, 3).layer_range(2)
