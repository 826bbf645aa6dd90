"""KV tiers end to end: a long prefix evicted from a tiny device pool comes back from CPU memory or disk
instead of being recomputed, with the same tokens as an engine that never lost it; the tiers keep
their size limits; a corrupt or missing block file is caught by its checks and recomputed; preempted
requests find their blocks in the tier when they resume."""

from __future__ import annotations

import random

import pytest

from helpers.workloads import mixed_workload, tokens
from tokenmill import LLM, SamplingParams
from tokenmill.scheduler.block_pool import hash_block

BLOCK = 4
POOL_BLOCKS = 20  # one 66 + 4 token request (18 blocks) at a time
_rng = random.Random(0)
PREFIX = [1] + [_rng.randrange(3, 380) for _ in range(63)]  # 16 blocks
FILLERS = [[1] + [_rng.randrange(3, 380) for _ in range(63)] for _ in range(3)]  # cycle the pool
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _generate(llm, prompt: list[int], params=GREEDY):
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]


def _evict_and_ask_again(llm) -> tuple[list[list[int]], int]:
    """Tokens of: the prefix + 2 tokens, three unrelated prompts that push it out of the device pool, the
    prefix + 2 other tokens; and how many tokens that last request found already computed."""
    outputs = [_generate(llm, prompt) for prompt in [PREFIX + [5, 6], *FILLERS, PREFIX + [7, 8]]]
    return tokens(outputs), outputs[-1].num_cached_tokens


def _block_bytes(folder, make_llm, **options) -> int:
    return make_llm(folder, **options).engine.core.runner.kv_transfer.bytes_per_block


def _tiers(llm):
    return llm.engine.core.block_store.tiers


@pytest.mark.parametrize("arch, dtype, kv_cache_dtype, tiers", [
    ("llama", "float32", "auto", "cpu"), ("llama", "float32", "auto", "disk"), ("llama", "float32", "auto", "cpu+disk"),
    ("gpt2", "float32", "auto", "disk"), ("qwen2", "bfloat16", "auto", "cpu"), ("llama", "float32", "int8", "cpu"),
    ("mistral", "float32", "fp8_e4m3", "disk")])
def test_an_evicted_prefix_comes_back_from_the_tier(arch, dtype, kv_cache_dtype, tiers, checkpoint, make_llm, tmp_path):
    folder = checkpoint(arch)
    options = dict(dtype=dtype, block_size=BLOCK, kv_cache_dtype=kv_cache_dtype)
    reference = make_llm(folder, **options)  # a pool that holds everything: the prefix is never lost
    expected, cached_in_reference = _evict_and_ask_again(reference)
    block_bytes = reference.engine.core.runner.kv_transfer.bytes_per_block
    offload = {}
    if "cpu" in tiers:  # with a disk tier behind it, the memory tier is too small for the prefix alone
        offload["kv_offload_memory"] = (8 if "disk" in tiers else 100) * block_bytes
    if "disk" in tiers:
        offload["kv_offload_folder"] = tmp_path
    llm = make_llm(folder, kv_cache_memory=POOL_BLOCKS * block_bytes, **options, **offload)
    assert llm.engine.core.num_blocks == POOL_BLOCKS
    got, num_cached = _evict_and_ask_again(llm)
    assert got == expected and cached_in_reference == 64
    assert num_cached == 64  # (66 - 1) // 4 blocks: all but the last token, restored from the tiers
    stats = llm.engine.core.stats().kv_tiers
    assert [s.name for s in stats] == tiers.split("+")
    assert sum(s.hits for s in stats) == 16 and all(s.failures == 0 for s in stats)
    assert llm.engine.core.kv_cache_manager.num_restored_tokens == 64
    assert llm.engine.core.kv_cache_manager.num_hit_tokens == 0  # the device pool had none of it


def test_without_a_tier_the_prefix_is_recomputed(checkpoint, make_llm):
    """The same workload with no tier: nothing comes back (so the test above measures the tiers)."""
    folder = checkpoint("llama")
    block_bytes = _block_bytes(folder, make_llm, dtype="float32", block_size=BLOCK)
    llm = make_llm(folder, dtype="float32", block_size=BLOCK, kv_cache_memory=POOL_BLOCKS * block_bytes)
    assert _evict_and_ask_again(llm)[1] == 0 and llm.engine.core.block_store is None


def test_the_tiers_keep_their_size_limits(checkpoint, make_llm, tmp_path):
    folder = checkpoint("llama")
    block_bytes = _block_bytes(folder, make_llm, dtype="float32", block_size=BLOCK)
    file_bytes = block_bytes + 52
    llm = make_llm(folder, dtype="float32", block_size=BLOCK, kv_cache_memory=POOL_BLOCKS * block_bytes,
                   kv_offload_memory=3 * block_bytes, kv_offload_folder=tmp_path, kv_offload_disk_space=10 * file_bytes)
    expected = _evict_and_ask_again(make_llm(folder, dtype="float32", block_size=BLOCK))[0]
    got, num_cached = _evict_and_ask_again(llm)
    memory, disk = _tiers(llm)
    disk.flush()
    files = list(disk.folder.glob("*.kv"))
    assert got == expected
    assert len(memory) == memory.capacity_blocks == 3 and memory.evictions > 0
    assert len(disk) == len(files) == 10 and sum(f.stat().st_size for f in files) <= 10 * file_bytes
    assert disk.evictions > 0
    # The prefix's first blocks were pushed out of both tiers: nothing before them can be restored.
    assert num_cached == 0


def _prefix_block_hashes() -> list[bytes]:
    hashes = []
    for i in range(16):
        hashes.append(hash_block(hashes[-1] if hashes else None, PREFIX[i * BLOCK:(i + 1) * BLOCK]))
    return hashes


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_block_file_is_recomputed_never_read(damage, checkpoint, make_llm, tmp_path):
    folder = checkpoint("llama")
    block_bytes = _block_bytes(folder, make_llm, dtype="float32", block_size=BLOCK)
    expected = _evict_and_ask_again(make_llm(folder, dtype="float32", block_size=BLOCK))[0]
    llm = make_llm(folder, dtype="float32", block_size=BLOCK, kv_cache_memory=POOL_BLOCKS * block_bytes,
                   kv_offload_folder=tmp_path)
    outputs = [_generate(llm, prompt) for prompt in [PREFIX + [5, 6], *FILLERS]]
    (disk,) = _tiers(llm)
    disk.flush()
    bad = 5 if damage == "corrupt" else 9
    path = disk.path(_prefix_block_hashes()[bad])
    if damage == "corrupt":  # one bit of one value: wrong K/V, same length
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    again = _generate(llm, PREFIX + [7, 8])
    assert tokens(outputs + [again]) == expected
    assert again.num_cached_tokens == bad * BLOCK  # the blocks before the bad one came back
    assert disk.failures == 1 and disk.hits == bad


def test_preempted_requests_resume_from_the_tier(checkpoint, make_llm, tmp_path):
    """Four requests that outgrow a 12-block pool together: the newest are preempted, their full blocks are
    evicted to the tier while the others run, and come back from it when they resume."""
    folder = checkpoint("llama")
    block_bytes = _block_bytes(folder, make_llm, dtype="float32", block_size=BLOCK)
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(19)]} for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = tokens(make_llm(folder, dtype="float32", block_size=BLOCK).generate(prompts, params, use_tqdm=False))
    llm = make_llm(folder, dtype="float32", block_size=BLOCK, kv_cache_memory=12 * block_bytes,
                   kv_offload_memory=64 * block_bytes)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    stats = llm.engine.core.stats()
    assert stats.num_preemptions > 0 and stats.kv_tiers[0].hits > 0 and stats.kv_tiers[0].stores > 0


def test_the_mixed_workload_is_unchanged_by_the_tiers(checkpoint, make_llm, tmp_path):
    """Greedy, seeded sampling and beam search sharing a prefix, in a pool that evicts: the same tokens."""
    folder = checkpoint("qwen2")
    prompts, params = mixed_workload()
    expected = tokens(make_llm(folder, dtype="float32", block_size=BLOCK).generate(prompts, params, use_tqdm=False))
    block_bytes = _block_bytes(folder, make_llm, dtype="float32", block_size=BLOCK)
    llm = make_llm(folder, dtype="float32", block_size=BLOCK, kv_cache_memory=40 * block_bytes,
                   kv_offload_memory=4 * block_bytes, kv_offload_folder=tmp_path, max_num_seqs=4)
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == expected  # again, with the tiers full
    assert sum(s.hits for s in llm.engine.core.stats().kv_tiers) > 0


@pytest.mark.parametrize("options, message", [
    (dict(kv_offload_memory="1MiB", enable_prefix_caching=False), "it needs enable_prefix_caching"),
    (dict(kv_offload_memory="1MiB", tensor_parallel_size=2), "runs in one process"),
    (dict(kv_offload_memory=100), "kv_offload_memory 100 bytes holds no KV block of 1024 bytes"),
    (dict(kv_offload_folder="FOLDER", kv_offload_disk_space=1000), "holds no KV block file of 1076 bytes"),
    (dict(kv_offload_memory="lots"), "kv_offload_memory 'lots' is not a size"),
])
def test_bad_tier_settings_are_refused_clearly(options, message, checkpoint, tmp_path):
    if options.get("kv_offload_folder") == "FOLDER":
        options["kv_offload_folder"] = tmp_path
    with pytest.raises(ValueError, match=message):
        LLM(str(checkpoint("llama")), device="cpu", dtype="float32", block_size=BLOCK, kv_cache_memory="64KiB",
            **options)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_on_cuda_a_prefix_comes_back_through_pinned_memory_and_disk(kv_cache_dtype, checkpoint, make_llm, tmp_path):
    folder = checkpoint("llama")
    options = dict(dtype="float32", block_size=BLOCK, device="cuda", kv_cache_dtype=kv_cache_dtype)
    reference = make_llm(folder, **options)
    expected = _evict_and_ask_again(reference)[0]
    block_bytes = reference.engine.core.runner.kv_transfer.bytes_per_block
    llm = make_llm(folder, kv_cache_memory=POOL_BLOCKS * block_bytes, kv_offload_memory=8 * block_bytes,
                   kv_offload_folder=tmp_path, **options)
    memory, disk = _tiers(llm)
    assert memory.slab.is_pinned()
    got, num_cached = _evict_and_ask_again(llm)
    assert got == expected and num_cached == 64
    assert memory.hits + disk.hits == 16
