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
