"""The C++ decode kernel against the portable PyTorch backend (itself checked against transformers)."""

from __future__ import annotations

import pytest
import torch

from helpers.devices import TRITON_DEVICE

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_paged import TorchPagedAttention


@pytest.fixture(scope="module")
def cpu_backend():
    from tokenmill.attention.cpu_paged import CpuPagedAttention
    from tokenmill.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the C++ kernel cannot be built here (no compiler); the portable backend is used instead")
    return CpuPagedAttention()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 64), (8, 2, 128), (6, 2, 24)])
def test_decode_kernel_matches_portable_backend(cpu_backend, dtype, num_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size = 40, 4
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor([1, 7, 13, 4, 16])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:4] for _ in seq_lens])  # (D, 4)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    lens = seq_lens.tolist()
    mask = (torch.arange(max(lens)) < seq_lens[:, None])[:, None, None, :]
    md = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(lens),
                           decode_block_tables=tables, decode_seq_lens=seq_lens, max_decode_seq_len=max(lens),
                           decode_mask=mask)
    ours = cpu_backend._decode(q, cache[0], cache[1], md, head_dim ** -0.5)
    reference = TorchPagedAttention()._decode(q, cache[0], cache[1], md, head_dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)



def _decode_inputs(dtype, num_heads, num_kv_heads, head_dim, seq_lens, block_size, seed=0):
    """A shuffled block pool, per-request block tables and queries for a decode step."""
    gen = torch.Generator().manual_seed(seed)
    width = max(seq_lens) // block_size + 1
    num_blocks = len(seq_lens) * width + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = order[:len(seq_lens) * width].view(len(seq_lens), width)  # (D, W), no block shared
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens)
    mask = (torch.arange(max(seq_lens)) < lens[:, None])[:, None, None, :]
    md = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(seq_lens),
                           decode_block_tables=tables, decode_seq_lens=lens, max_decode_seq_len=max(seq_lens),
                           decode_mask=mask)
    return q, cache, md


# Contexts over many blocks (and ending inside one), blocks of 4-32 tokens; groups of 1-8 query heads
# (6 per KV head has no compiled case and takes the generic loop).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (12, 2, 64), (16, 2, 128), (4, 4, 128)])
@pytest.mark.parametrize("block_size", [16, 4, 32])
def test_decode_kernel_long_contexts_match_portable_backend(cpu_backend, dtype, num_heads, num_kv_heads, head_dim,
                                                            block_size):
    q, cache, md = _decode_inputs(dtype, num_heads, num_kv_heads, head_dim, [1, 15, 16, 17, 50, 203], block_size)
    ours = cpu_backend._decode(q, cache[0], cache[1], md, head_dim ** -0.5)
    reference = TorchPagedAttention()._decode(q.float(), cache[0].float(), cache[1].float(), md, head_dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_splits_very_long_contexts_and_merges_them_exactly(cpu_backend, dtype):
    """Contexts are cut into an even number of chunks of at least 64 tokens, at most 16 (1100 tokens: 16
    chunks of 4-5 blocks, 2500: 16 of 9-10, 129: 2, 128: 2); the merged result matches the portable
    backend and has the same bits on 1 thread as on 2."""
    q, cache, md = _decode_inputs(dtype, 9, 3, 64, [1100, 2500, 129, 128], 16)
    ours = cpu_backend._decode(q, cache[0], cache[1], md, 0.125)
    reference = TorchPagedAttention()._decode(q.float(), cache[0].float(), cache[1].float(), md, 0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference, atol=tolerance, rtol=tolerance)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = cpu_backend._decode(q, cache[0], cache[1], md, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (16, 2, 128)])
def test_decode_kernel_output_does_not_depend_on_the_batch(cpu_backend, dtype, num_heads, num_kv_heads, head_dim):
    """A request's attention output has the same bits alone and among others in a batch (the C++ decode
    step and continuous batching rely on it)."""
    q, cache, md = _decode_inputs(dtype, num_heads, num_kv_heads, head_dim, [37, 5, 130, 64, 16, 99, 3, 250], 16)
    batched = cpu_backend._decode(q, cache[0], cache[1], md, head_dim ** -0.5)
    for row in range(q.shape[0]):
        one = AttentionMetadata(slot_mapping=md.slot_mapping, num_decodes=1,
                                decode_block_tables=md.decode_block_tables[row:row + 1],
                                decode_seq_lens=md.decode_seq_lens[row:row + 1],
                                max_decode_seq_len=int(md.decode_seq_lens[row]), decode_mask=None)
        alone = cpu_backend._decode(q[row:row + 1], cache[0], cache[1], one, head_dim ** -0.5)
        assert torch.equal(alone[0], batched[row]), f"request {row} changed with the batch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_reads_queries_in_place_from_fused_qkv_rows(cpu_backend, dtype):
    """q as the C++ decode step passes it, a view of the fused qkv rows (rows (nh + 2 nkv) d apart): the
    same bits as a contiguous copy, for every kernel (float, int8 cache), without copying it."""
    from tokenmill.kernels import cpu_kernels

    kernels = cpu_kernels()
    num_heads, num_kv_heads, head_dim = 9, 3, 64
    q, cache, md = _decode_inputs(dtype, num_heads, num_kv_heads, head_dim, [37, 5, 130], 16)
    qkv = torch.randn(3, num_heads + 2 * num_kv_heads, head_dim).to(dtype)
    qkv[:, :num_heads] = q
    strided = qkv.narrow(1, 0, num_heads)
    assert not strided.is_contiguous()
    args = (md.decode_block_tables, md.decode_seq_lens, head_dim ** -0.5)
    assert torch.equal(kernels.paged_decode_attention(strided, cache[0], cache[1], *args),
                       kernels.paged_decode_attention(q, cache[0], cache[1], *args))
    if dtype == torch.bfloat16:
        codes = torch.randint(-127, 128, cache.shape, dtype=torch.int8)
        scales = torch.rand(cache.shape[:4], dtype=torch.float16) / 100
        int8_cache = (codes[0], codes[1], scales[0], scales[1])
        assert torch.equal(kernels.paged_decode_attention_int8(strided, *int8_cache, *args),
                           kernels.paged_decode_attention_int8(q, *int8_cache, *args))


def test_write_kv_copies_rows_to_their_slots_and_skips_padding(cpu_backend):
    kernels = cpu_backend.kernels
    key_cache, value_cache = torch.zeros(2, 3, 4, 2, 8, dtype=torch.bfloat16)  # (blocks, bs, nkv, d) each
    qkv = torch.randn(3, 5 * 16, dtype=torch.bfloat16)  # rows hold q, k, v side by side: k and v are strided
    k, v = qkv[:, 16:32].view(3, 2, 8), qkv[:, 32:48].view(3, 2, 8)
    kernels.write_kv(k, v, key_cache, value_cache, torch.tensor([5, -1, 11]))
    flat_k, flat_v = key_cache.view(12, 2, 8), value_cache.view(12, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[11], k[2])
    assert torch.equal(flat_v[5], v[0]) and torch.equal(flat_v[11], v[2])
    assert int((flat_k != 0).any(-1).any(-1).sum()) == 2 and int((flat_v != 0).any(-1).any(-1).sum()) == 2
    with pytest.raises(RuntimeError, match="slot 12 is past the cache's 12 slots"):
        kernels.write_kv(k, v, key_cache, value_cache, torch.tensor([0, 1, 12]))


def test_write_kv_int8_quantizes_rows_into_their_slots_and_checks_them(cpu_backend):
    kernels = cpu_backend.kernels
    codes = torch.zeros(2, 3, 4, 2, 8, dtype=torch.int8)  # (K/V, blocks, bs, nkv, d)
    scales = torch.zeros(2, 3, 4, 2, dtype=torch.float16)
    qkv = torch.randn(3, 5 * 16, dtype=torch.bfloat16)  # k and v are strided slices of the rows
    k, v = qkv[:, 16:32].view(3, 2, 8), qkv[:, 32:48].view(3, 2, 8)
    kernels.write_kv_int8(k, v, codes[0], codes[1], scales[0], scales[1], torch.tensor([5, -1, 11]))
    flat_codes, flat_scales = codes.view(2, 12, 2, 8), scales.view(2, 12, 2)
    for side, x in ((0, k), (1, v)):
        for slot, row in ((5, 0), (11, 2)):
            restored = flat_codes[side, slot].float() * flat_scales[side, slot, :, None].float()
            assert torch.allclose(restored, x[row].float(), atol=float(x[row].abs().max()) / 127)
    assert int((flat_scales != 0).sum()) == 2 * 2 * 2  # two slots, two heads, K and V
    with pytest.raises(RuntimeError, match="slot 12 is past the cache's 12 slots"):
        kernels.write_kv_int8(k, v, codes[0], codes[1], scales[0], scales[1], torch.tensor([0, 1, 12]))


def test_cpu_backend_writes_the_float_cache_through_write_kv(cpu_backend):
    """The Python forward of the cpu backend (prompts, and decodes outside the C++ step) writes new rows
    with the kernel the C++ step uses, and they land where the portable backend's index_copy_ puts them."""
    import dataclasses

    from tokenmill.attention.cpu_paged import CpuPagedAttention

    calls = []

    class Recording:
        def __getattr__(self, name):
            attr = getattr(cpu_backend.kernels, name)
            if name != "write_kv":
                return attr
            return lambda *args: (calls.append(args[-1].tolist()), attr(*args))[1]

    backend = CpuPagedAttention()
    backend.kernels = Recording()
    q, cache, md = _decode_inputs(torch.bfloat16, 9, 3, 64, [20, 7], 16)
    k, v = torch.randn(2, 2, 3, 64).to(torch.bfloat16)
    slots = torch.stack([md.decode_block_tables[i, (n - 1) // 16] * 16 + (n - 1) % 16
                         for i, n in enumerate(md.decode_seq_lens.tolist())])
    md = dataclasses.replace(md, slot_mapping=slots)
    reference_cache = cache.clone()
    TorchPagedAttention()._write(k, v, reference_cache[0], reference_cache[1], slots)
    out = backend.forward(q, k, v, cache, md, 0.125)
    assert calls == [slots.tolist()]
    assert torch.equal(cache, reference_cache)
    torch.testing.assert_close(out.float(), TorchPagedAttention()._decode(q, cache[0], cache[1], md, 0.125).float(),
                               atol=2e-2, rtol=2e-2)

@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_engine_parity_on_each_backend(backend, checkpoint, make_llm, monkeypatch):
    """Greedy tokens under mixed lengths, chunking and preemption are the same on every backend
    (``torch`` here also switches off every fused CPU kernel: the pure PyTorch path, as on CUDA;
    ``triton`` runs its kernels in Triton's interpreter on CPU)."""
    import random

    from tokenmill import SamplingParams

    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed")
    if backend in ("torch", "triton"):
        monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    else:
        from tokenmill.kernels import cpu_kernels

        if cpu_kernels() is None:
            pytest.skip("the C++ kernel cannot be built here")
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(2, 50))]} for _ in range(5)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    reference = make_llm(checkpoint("qwen2"), attention_backend="torch")  # roomy: no preemption
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    llm = make_llm(checkpoint("qwen2"), attention_backend=backend, block_size=4, max_num_batched_tokens=9,
                   kv_cache_memory=24 * 2 * 2 * 3 * 8 * 4 * 4, device=TRITON_DEVICE if backend == "triton" else "cpu")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert got == expected


def test_unknown_backend_is_rejected(checkpoint):
    from tokenmill import LLM

    with pytest.raises(ValueError, match="attention backend 'flash' is not supported; supported: auto, torch, cpu, triton"):
        LLM(str(checkpoint("llama")), attention_backend="flash", device="cpu")


def test_triton_backend_reuses_prefix_cache_hits(checkpoint, make_llm, monkeypatch):
    """Prompts sharing a 40-token prefix: later ones start from cached blocks, so their first chunk
    attends to a cached context (the prefill kernel's num_computed_tokens > 0), with the same tokens."""
    pytest.importorskip("triton", reason="the triton package is not installed")
    from tokenmill import SamplingParams

    monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    prefix = [1] + list(range(10, 49))
    prompts = [{"prompt_token_ids": prefix + [100 + i, 200 + i, 300 - i]} for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids
                for o in make_llm(checkpoint("llama"), attention_backend="torch").generate(prompts, params,
                                                                                           use_tqdm=False)]
    llm = make_llm(checkpoint("llama"), attention_backend="triton", block_size=8, device=TRITON_DEVICE)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert all(o.num_cached_tokens == 40 for o in rest)
    assert [o.outputs[0].token_ids for o in first + rest] == expected


def test_cpu_fused_ops_stay_finite_on_large_activations():
    """The C++ kernels are built with -ffast-math, which assumes no infinities: silu of a gate below
    -88 (exp overflows) gave NaN where PyTorch gives ~0, and a random-weight model's logits NaN."""
    from tokenmill.kernels import cpu_kernels

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the C++ kernels cannot be built here")
    gate = torch.tensor([[-1000.0, -100.0, -89.0, -20.0, 0.0, 20.0, 100.0, 1000.0]])
    up = torch.full_like(gate, 3.0)
    out = kernels.silu_and_mul(torch.cat([gate, up], dim=-1))
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up)
