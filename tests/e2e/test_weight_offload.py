"""Weight offloading: units (embedding, decoder layers, LM head) past the weight budget live on disk (or in
pinned CPU memory on CUDA) and stream back for their own forward pass.

Greedy tokens equal no offload on every architecture, in float32 and bf16 (prepacked weights stored
plain and packed again), with int8/int4 weights and over two pipeline stages; the process's anonymous
memory, sampled while it generates, stays within the budget plus the two units in flight."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.checkpoints import ARCHITECTURES, MOE_ARCHITECTURES
from helpers.workloads import PROMPT, mixed_workload, tokens
from tokenmill import SamplingParams
from tokenmill.offload.weights import tensor_bytes, unit_tensors


def _weight_bytes(llm) -> int:
    return tensor_bytes(unit_tensors(llm.engine.core.runner.model))


@pytest.mark.parametrize("arch, dtype, quantization", [(arch, "float32", None) for arch in ARCHITECTURES + MOE_ARCHITECTURES]
                         + [("llama", "bfloat16", None), ("llama", "float32", "int8"), ("qwen2", "bfloat16", "int4")])
def test_a_quarter_of_the_weights_resident_gives_the_same_tokens(arch, dtype, quantization, checkpoint, make_llm,
                                                                   tmp_path):
    folder = checkpoint(arch)
    options = dict(dtype=dtype, block_size=4, quantization=quantization)
    prompts, params = mixed_workload()
    whole = make_llm(folder, **options)
    expected = tokens(whole.generate(prompts, params, use_tqdm=False))
    budget = _weight_bytes(whole) // 4
    llm = make_llm(folder, offload_folder=tmp_path, max_weight_memory=budget, **options)
    streamer = llm.engine.core.runner.model.weight_streamer
    assert streamer.stats.num_units >= 2 and _weight_bytes(llm) - streamer.stats.mapped_bytes <= budget
    assert len(list(tmp_path.glob("*/unit-*.safetensors"))) == streamer.stats.num_units
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    largest = max(streamer.unit_bytes)
    assert streamer.stats.fetches > 0 and streamer.stats.peak_streamed_bytes <= 2 * largest


def test_a_tied_head_and_embedding_stream_as_one_tensor(checkpoint, tmp_path):
    """Plain (not prepacked) weights, as on CUDA: the LM head and the embedding share one parameter, which
    both units must store before either empties it."""
    import dataclasses

    from tokenmill.llm import LLM, engine_config

    prompts, params = mixed_workload()
    base = engine_config(str(checkpoint("llama_tp")), dtype="float32", device="cpu", kv_cache_memory="8MiB",
                         block_size=4)
    whole = LLM.from_engine_config(dataclasses.replace(base, prepack_weights=False))
    model = whole.engine.core.runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = tokens(whole.generate(prompts, params, use_tqdm=False))
    llm = LLM.from_engine_config(dataclasses.replace(base, prepack_weights=False, offload_folder=str(tmp_path),
                                                     max_weight_memory=1))
    assert llm.engine.core.runner.model.weight_streamer.names == ["embedding", "layer 0", "layer 1", "lm_head"]
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    llm.shutdown()


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_on_or_off_and_over_two_pipeline_stages(prefetch, checkpoint, make_llm, tmp_path):
    """Qwen2-MoE's 3 layers over two stages: rank 0 streams layers 0 and 1 (its embedding stays in its file,
    read by rows), rank 1 layer 2 and the head."""
    folder = checkpoint("qwen2_moe")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, [1] + list(range(5, 40)))]
    expected = tokens(make_llm(folder, dtype="float32").generate(prompts, params, use_tqdm=False))
    llm = make_llm(folder, dtype="float32", offload_folder=tmp_path, max_weight_memory=1, offload_prefetch=prefetch,
                   pipeline_parallel_size=2)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    # The embedding is read by rows straight from the checkpoint's own file: no copy in the folder.
    assert len(list(tmp_path.glob("*/unit-*.safetensors"))) == 4 and not list(tmp_path.glob("*/embedding.bin"))
    streamer = llm.engine.core.runner.model.weight_streamer  # rank 0's: with prefetch, layer 1 arrives while
    assert streamer.names == ["layer 0", "layer 1"] and streamer.stats.mapped_bytes > 0  # layer 0 computes
    assert streamer.stats.mapped_from == "the checkpoint's own model.safetensors"
    assert (streamer.stats.peak_streamed_bytes == sum(streamer.unit_bytes)) == prefetch
    llm.shutdown()
    assert not list(tmp_path.glob("*/*"))  # each rank removes its files when it stops


@pytest.mark.parametrize("source", ["llama2.c", "gguf", "gptq act-order"])
def test_every_checkpoint_kind_loads_unit_by_unit_into_the_offload(source, checkpoint, make_llm, tmp_path):
    """The weights stream into the disk tier as they load (``offload/streamed_load.py``) from each kind of
    source, in its own order: llama2.c keeps each matrix type for all layers together, GGUF and GPTQ
    safetensors group them by layer. The same greedy tokens as without offload."""
    from helpers.gptq_checkpoints import GPTQSpec, gptq_test_config, make_gptq_checkpoint
    from helpers.shared_models import smollm2_gguf, stories_dir

    options = {}
    if source == "llama2.c":
        model = stories_dir() / "stories260K.bin"
        options["tokenizer"] = str(stories_dir() / "tok512.bin")
    elif source == "gguf":
        model = smollm2_gguf()
    else:
        model = tmp_path / "gptq"
        make_gptq_checkpoint(model, gptq_test_config("llama"), GPTQSpec(bits=4, group_size=32, sym=False,
                                                                          desc_act=True))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [{"prompt_token_ids": [1, 45, 99, 3, 250]}]
    expected = tokens(make_llm(model, dtype="float32", **options).generate(prompt, params, use_tqdm=False))
    llm = make_llm(model, dtype="float32", offload_folder=tmp_path / "offload", max_weight_memory=1, **options)
    streamer = llm.engine.core.runner.model.weight_streamer
    assert streamer.stats.num_units >= 2 and len(list((tmp_path / "offload").glob("*/unit-*"))) == streamer.stats.num_units
    assert tokens(llm.generate(prompt, params, use_tqdm=False)) == expected


def test_offload_options_are_checked_naming_them(tmp_path):
    from tokenmill.llm import LLM, engine_config

    with pytest.raises(ValueError, match="offload_folder and max_weight_memory go together"):
        engine_config("tiny-llama", offload_folder=str(tmp_path))
    with pytest.raises(ValueError, match="max_weight_memory 'lots' is not a size"):
        engine_config("tiny-llama", offload_folder=str(tmp_path), max_weight_memory="lots")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cpu_offload_gb streams weights from CPU memory to a GPU; the device is cpu"):
            LLM("tiny-llama", device="cpu", cpu_offload_gb=0.001)
        with pytest.raises(ValueError, match="cpu_offload_gb streams weights from CPU memory to a GPU; the device is cpu"):
            LLM("tiny-llama", device="cpu", cpu_offload_gb=0.001, offload_folder=str(tmp_path), max_weight_memory=1)


_MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    from tokenmill import LLM, SamplingParams

    def anonymous():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    torch.set_num_threads(1)
    LLM("tiny-llama", dtype="bfloat16", device="cpu", kv_cache_memory="1MiB")  # libraries and kernels loaded
    before = anonymous()
    peak, running = [0], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], anonymous())
            time.sleep(0.002)
    watcher = threading.Thread(target=sample)
    watcher.start()
    llm = LLM(sys.argv[1], dtype="bfloat16", device="cpu", kv_cache_memory="4MiB", skip_tokenizer_init=True,
              offload_folder=sys.argv[2], max_weight_memory="32MiB", max_model_len=64)
    loading = peak[0] - before
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    running[0] = False
    watcher.join()
    streamer = llm.engine.core.runner.model.weight_streamer
    print(json.dumps({"loading": loading, "growth": peak[0] - before, "offloaded": streamer.stats.offloaded_bytes,
                      "largest": max(streamer.unit_bytes)}))
""")


def test_a_model_larger_than_the_budget_loads_and_runs_within_it(tmp_path):
    """The smollm2-135m shape in bf16 (~270 MB of weights, 330 MB with the tied head's panels) with a
    32 MiB budget: from before loading to the end of generating, the process's anonymous memory grows by
    at most the budget, the two units in flight (the 57 MB tied embedding and a layer) and 64 MiB of
    activations, KV cache and allocator slack. Loading offloads each unit as it completes; the
    whole model is never in memory."""
    script = tmp_path / "measure.py"
    script.write_text(_MEASURE)
    done = subprocess.run([sys.executable, str(script), "smollm2-135m", str(tmp_path / "offload")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["offloaded"] > 200 * 2**20  # nearly all of it is on disk
    assert measured["growth"] <= 32 * 2**20 + 2 * measured["largest"] + 64 * 2**20, measured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefetch", [True, False])
def test_cpu_offload_gb_streams_from_pinned_memory_to_the_gpu(prefetch, checkpoint, make_llm):
    """Three quarters of the weights in pinned CPU memory: the same tokens; the GPU holds the rest, and
    while generating at most two units more (one computing, one arriving on the side stream)."""
    folder = checkpoint("llama_tp")
    prompts, params = mixed_workload()
    whole = make_llm(folder, dtype="float32", device="cuda", block_size=4)
    expected = tokens(whole.generate(prompts, params, use_tqdm=False))
    total = _weight_bytes(whole)
    llm = make_llm(folder, dtype="float32", device="cuda", block_size=4, cpu_offload_gb=0.75 * total / 2**30,
                   offload_prefetch=prefetch)
    streamer = llm.engine.core.runner.model.weight_streamer
    assert streamer.stats.offloaded_bytes >= 0.75 * total and _weight_bytes(llm) <= 0.25 * total
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    growth = torch.cuda.max_memory_allocated() - before
    assert growth <= 2 * max(streamer.unit_bytes) + 16 * 2**20, growth  # + activations of this tiny model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_offload_gb_loads_without_the_whole_model_on_the_gpu():
    """The smollm2-135m shape in bf16 (270 MB) with 0.2 GiB in pinned memory: while it loads, the GPU never
    holds more than the resident weights, the two largest units (one arriving, one being processed) and
    the KV cache; the units go to the GPU one by one and leave for pinned memory."""
    from tokenmill import LLM

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    llm = LLM("smollm2-135m", dtype="bfloat16", device="cuda", kv_cache_memory="4MiB", cpu_offload_gb=0.2,
              skip_tokenizer_init=True, max_model_len=64)
    peak = torch.cuda.max_memory_allocated() - before
    streamer = llm.engine.core.runner.model.weight_streamer
    assert streamer.stats.offloaded_bytes >= 0.2 * 2**30
    assert peak <= _weight_bytes(llm) + 2 * max(streamer.unit_bytes) + 4 * 2**20 + 16 * 2**20, peak
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_weights_split_between_pinned_memory_and_disk(checkpoint, make_llm, tmp_path):
    """``cpu_offload_gb`` with ``offload_folder``: nothing stays on the GPU, half the bytes go to pinned
    memory (the first units to stream) and the rest to files; the same tokens."""
    from tokenmill.offload.weight_tiers import SplitTier

    folder = checkpoint("llama")
    prompts, params = mixed_workload()
    whole = make_llm(folder, dtype="float32", device="cuda", block_size=4)
    expected = tokens(whole.generate(prompts, params, use_tqdm=False))
    total = _weight_bytes(whole)
    llm = make_llm(folder, dtype="float32", device="cuda", block_size=4, offload_folder=tmp_path,
                   max_weight_memory=1, cpu_offload_gb=0.5 * total / 2**30)
    streamer = llm.engine.core.runner.model.weight_streamer
    tier = streamer.tier
    assert isinstance(tier, SplitTier)
    pinned = [name for name in streamer.names if tier.tier_of(name) is tier.host]
    on_disk = [name for name in streamer.names if tier.tier_of(name) is tier.disk]
    assert pinned == streamer.names[:len(pinned)] and pinned and on_disk  # the first to stream are pinned
    assert 0 < tier.host_used <= 0.5 * total
    assert len(list(tmp_path.glob("*/unit-*.safetensors"))) == len(on_disk)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
