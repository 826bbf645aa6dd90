"""Tensor (and expert) parallelism on CPU: gloo, worker processes started by the engine, 1 thread per rank.

Logits equal transformers' within 1e-4 and greedy tokens equal one process's, on dense
architectures with grouped and replicated KV heads (fewer KV heads than ranks), biases on
row-parallel projections, q/k norms and a vocabulary the degree does not divide; the engine's
features (chunked prefill, prefix caching, preemption, beam search, seeded sampling) give the
same outputs as one process; what cannot be split is refused with the reason."""

from __future__ import annotations

import dataclasses
import time

import pytest

from helpers.checkpoints import MOE_ARCHITECTURES
from helpers.gptq_checkpoints import GPTQSpec, gptq_test_config, make_gptq_checkpoint
from helpers.workloads import matches_reference_and_one_process, mixed_workload, tokens
from tokenmill import SamplingParams
from tokenmill.distributed.parallel_state import TensorParallelGroup, partition
from tokenmill.errors import ModelLoadError
from tokenmill.layers.moe import FusedMoE


@pytest.mark.parametrize("arch, degree", [("llama", 2), ("llama_linear", 2), ("mistral", 2), ("qwen3", 2),
                                          ("llama_tp", 2), ("llama_tp", 4), ("gpt2", 2)])
def test_logits_equal_reference_and_tokens_equal_one_process(arch, degree, checkpoint, make_llm):
    """GPT-2: its fused q/k/v Conv1D split by heads, q, k and v each."""
    folder = checkpoint(arch)
    llm = make_llm(folder, dtype="float32", block_size=4, tensor_parallel_size=degree)
    workers = llm.engine.core.executor.processes
    assert len(workers) == degree - 1 and all(p.is_alive() for p in workers)
    model = llm.engine.core.runner.model
    attn = model.transformer.h[0].attn if arch == "gpt2" else model.model.layers[0].self_attn
    cfg = model.config
    assert attn.num_heads == cfg.num_attention_heads // degree  # this rank's share
    if arch != "gpt2":
        assert attn.num_kv_heads == max(1, cfg.num_key_value_heads // degree)
    assert model.lm_head.out_features == -(-cfg.vocab_size // degree)
    matches_reference_and_one_process(llm, folder, make_llm, label=f"{arch} tp={degree}")


def test_engine_features_give_the_same_outputs_as_one_process(checkpoint, make_llm):
    """Chunked prefill (16 tokens per step), prefix hits, preemption (room for ~2 requests), seeded
    sampling and beam search, all in one batch."""
    folder = checkpoint("llama_tp")
    options = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory=2 * 2 * 1 * 8 * 4 * 4 * 40)
    prompts, params = mixed_workload()
    expected = tokens(make_llm(folder, **options).generate(prompts, params, use_tqdm=False))
    llm = make_llm(folder, tensor_parallel_size=2, **options)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    stats = llm.engine.core.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["experts-split", "expert-parallel"])
def test_mixture_of_experts_split_or_placed_over_ranks_equals_one_process(arch, expert_parallel, checkpoint, make_llm):
    """Experts split by rows (tensor parallel) or placed whole on the ranks (expert parallel; 5 experts
    over 2 ranks: 2 and 3): logits equal transformers' and tokens one process's."""
    folder = checkpoint(arch)
    llm = make_llm(folder, dtype="float32", block_size=4, tensor_parallel_size=2,
                   enable_expert_parallel=expert_parallel)
    model = llm.engine.core.runner.model
    experts = next(m for m in model.modules() if isinstance(m, FusedMoE))
    cfg = model.config.moe
    if expert_parallel:
        assert experts.num_local_experts == cfg.num_experts // 2 and experts.w13.shape[1] == 2 * cfg.expert_intermediate_size
    else:
        assert experts.num_local_experts == cfg.num_experts and experts.w13.shape[1] == cfg.expert_intermediate_size
    matches_reference_and_one_process(llm, folder, make_llm, label=f"{arch} ep={expert_parallel}")


GPTQ_CASES = {"4bit-g16-sym-v1": ("llama", GPTQSpec(bits=4, group_size=16, sym=True)),
              "8bit-channel-sym": ("llama", GPTQSpec(bits=8, group_size=-1, sym=True)),
              "4bit-g16-asym-v2-qwen2": ("qwen2", GPTQSpec(bits=4, group_size=16, sym=False, checkpoint_format="gptq_v2")),
              "4bit-g32-gpt2": ("gpt2", GPTQSpec(bits=4, group_size=32, sym=True))}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_checkpoints_split_over_ranks_like_one_process(case, make_llm, tmp_path):
    """Packed codes, zero points and scales cut by outputs (column; GPT-2's fused q/k/v by heads of each) or
    by whole groups of inputs (row, g_idx renumbered from the rank's first group); per-channel scales whole
    on every rank."""
    kind, spec = GPTQ_CASES[case]
    reference = make_gptq_checkpoint(tmp_path / case, gptq_test_config(kind), spec)
    llm = make_llm(tmp_path / case, dtype="float32", block_size=4, tensor_parallel_size=2)
    matches_reference_and_one_process(llm, tmp_path / case, make_llm, reference=reference, label=f"gptq {case} tp=2")


def test_what_cannot_be_split_is_refused_with_the_reason(checkpoint, make_llm):
    with pytest.raises(ValueError, match=r"3 KV heads cannot be split evenly over tensor_parallel_size 2"):
        make_llm(checkpoint("qwen2"), dtype="float32", tensor_parallel_size=2)


def test_only_kv_heads_replicate_over_more_ranks_than_heads():
    """Query heads (or rows) replicated would be summed twice by the row-parallel projection after them."""
    eight = TensorParallelGroup(5, 8)
    assert partition(2, eight, "KV heads", replicate=True) == (1, 1)  # ranks 4..7 share KV head 1
    with pytest.raises(ValueError, match="4 attention heads cannot be split over tensor_parallel_size 8"):
        partition(4, eight, "attention heads")


@pytest.mark.parametrize("spec, why", [
    (GPTQSpec(bits=4, group_size=16, desc_act=True), r"o_proj: an act-order GPTQ checkpoint \(desc_act: true\)"),
    (GPTQSpec(bits=4, group_size=64), r"o_proj: 32 inputs per tensor-parallel rank do not hold whole groups of 64 \(group_size\)"),
])
def test_gptq_layers_that_cannot_be_split_are_refused_naming_the_field(spec, why, tmp_path):
    from tokenmill import LLM

    make_gptq_checkpoint(tmp_path / "gptq", gptq_test_config("llama"), spec)
    with pytest.raises(ModelLoadError, match=why):
        LLM(str(tmp_path / "gptq"), dtype="float32", device="cpu", kv_cache_memory="8MiB", tensor_parallel_size=2)


def _worker_that_exits(rank, size, port, config, threads):
    raise SystemExit(3)


def _worker_that_never_joins(rank, size, port, config, threads):
    time.sleep(60)


# A rank that exits is named as soon as it has exited: its timeout only has to outlast the start of a
# process (importing torch alone takes 2-3 s on a slow 2-core machine).
@pytest.mark.parametrize("worker, timeout_s, message", [
    (_worker_that_exits, 20, r"distributed rank 1 exited with code 3 before joining"),
    (_worker_that_never_joins, 3, r"distributed rank\(s\) \[1\] did not start within 3 s"),
])
def test_a_rank_that_dies_or_never_joins_fails_start_up_naming_it(worker, timeout_s, message, checkpoint, monkeypatch):
    from tokenmill.distributed import executor
    from tokenmill.llm import LLM, engine_config

    monkeypatch.setattr(executor, "worker_main", worker)
    config = dataclasses.replace(engine_config(str(checkpoint("llama")), dtype="float32", device="cpu",
                                               kv_cache_memory="8MiB", tensor_parallel_size=2),
                                 distributed_timeout_s=timeout_s)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        LLM.from_engine_config(config)
    assert time.monotonic() - started < 30
