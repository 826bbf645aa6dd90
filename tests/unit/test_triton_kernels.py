"""The Triton attention kernels against the portable PyTorch backend (itself checked against
transformers). Without a GPU they run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1,
set in conftest before anything imports them), in float32 and float16."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.attention.backend import AttentionMetadata, PrefillSpan
from tokenmill.attention.torch_paged import TorchPagedAttention

triton = pytest.importorskip("triton", reason="the triton package is not installed")

from helpers.devices import TRITON_DEVICE as DEVICE  # noqa: E402
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def kernels():
    from tokenmill.attention.triton_paged import triton_available

    why = triton_available(torch.device(DEVICE))
    if why is not None:
        pytest.skip(why)
    from tokenmill.attention.kernels import paged_attention

    return paged_attention


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-5 if dtype == torch.float32 else 2e-3


def test_write_kv_fills_slots_and_skips_negative_ones(kernels):
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 6, 4, 3, 8, device=DEVICE)
    k, v = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)
    slots = torch.tensor([0, 7, -1, 23, 12])
    kernels.write_kv(k.to(DEVICE), v.to(DEVICE), cache, slots.to(DEVICE))
    flat = cache.cpu().view(2, 24, 3, 8)
    keep = slots >= 0
    torch.testing.assert_close(flat[0, slots[keep]], k[keep])
    torch.testing.assert_close(flat[1, slots[keep]], v[keep])
    written = torch.zeros(24, dtype=torch.bool)
    written[slots[keep]] = True
    assert flat[:, ~written].abs().sum() == 0  # the -1 token went nowhere (and not to the last slot)


def test_decode_padding_rows_attend_to_nothing(kernels):
    """Rows with seq_len 0 (a fixed-size batch padded, as CUDA graphs need) give zeros, not NaN,
    and leave the real rows as they are."""
    q, cache, md = _decode_case(6, 2, 32, 4, torch.float32, [5, 9])
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    padded_q = torch.cat([q, torch.randn(2, 6, 32)])
    tables = torch.cat([md.decode_block_tables, torch.zeros(2, md.decode_block_tables.shape[1], dtype=torch.long)])
    lens = torch.tensor([5, 9, 0, 0])
    out = kernels.paged_decode(dev(padded_q), dev(cache), dev(tables), dev(lens), 9, 32 ** -0.5, 2).cpu()
    alone = kernels.paged_decode(dev(q), dev(cache), dev(md.decode_block_tables), dev(md.decode_seq_lens), 9,
                                 32 ** -0.5, 2).cpu()
    assert torch.equal(out[:2], alone) and torch.equal(out[2:], torch.zeros(2, 6, 32))


def _decode_case(num_heads, num_kv_heads, head_dim, block_size, dtype, seq_lens):
    gen = torch.Generator().manual_seed(0)
    width = max(-(-n // block_size) for n in seq_lens)
    num_blocks = width * len(seq_lens) + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[:width * len(seq_lens)].view(len(seq_lens), width)
    lens = torch.tensor(seq_lens)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    mask = (torch.arange(max(seq_lens)) < lens[:, None])[:, None, None, :]
    md = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(seq_lens),
                           decode_block_tables=tables, decode_seq_lens=lens, max_decode_seq_len=max(seq_lens),
                           decode_mask=mask)
    return q, cache, md


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 2, 24)])
@pytest.mark.parametrize("block_size, num_splits", [(4, 1), (16, 3), (1, 2)])
def test_split_kv_decode_matches_portable_backend(kernels, dtype, num_heads, num_kv_heads, head_dim, block_size,
                                                  num_splits):
    q, cache, md = _decode_case(num_heads, num_kv_heads, head_dim, block_size, dtype, [1, 7, 70, 33, 16])
    scale = head_dim ** -0.5
    reference = TorchPagedAttention()._decode(q.float(), cache[0].float(), cache[1].float(), md, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    ours = kernels.paged_decode(dev(q), dev(cache), dev(md.decode_block_tables), dev(md.decode_seq_lens),
                                md.max_decode_seq_len, scale, num_splits)
    tol = _tolerance(dtype)
    torch.testing.assert_close(ours.float().cpu(), reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(6, 2, 32, 4), (4, 4, 24, 16), (8, 1, 64, 8)])
def test_varlen_prefill_matches_portable_backend(kernels, dtype, num_heads, num_kv_heads, head_dim, block_size):
    """Three chunks in one launch: a fresh prompt, a chunk after 21 cached tokens (a prefix hit or
    an earlier chunk), and a long one after 5, packed behind two decode rows."""
    gen = torch.Generator().manual_seed(1)
    chunks = [(0, 9), (21, 6), (5, 40)]  # (num_computed_tokens, new tokens)
    num_decode_rows = 2
    widths = [-(-(c + n) // block_size) for c, n in chunks]
    num_blocks = sum(widths) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    tables, offset = [], 0
    for w in widths:
        tables.append(perm[offset:offset + w])
        offset += w
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    total = num_decode_rows + sum(n for _, n in chunks)
    q = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
    spans, start = [], num_decode_rows
    for (computed, n), table in zip(chunks, tables):
        spans.append(PrefillSpan(start, start + n, computed, table))
        start += n
    scale = head_dim ** -0.5
    reference = torch.zeros(total, num_heads, head_dim)
    key_cache, value_cache = cache[0].float(), cache[1].float()
    for span in spans:  # keys of the chunk itself come from the cache too: make the portable path read them there
        rows = slice(span.query_start, span.query_end)
        positions = torch.arange(span.num_computed_tokens, span.seq_len)
        slots = span.block_table[positions // block_size] * block_size + positions % block_size
        k_new = key_cache.view(-1, num_kv_heads, head_dim)[slots]
        v_new = value_cache.view(-1, num_kv_heads, head_dim)[slots]
        reference[rows] = TorchPagedAttention._prefill(q[rows].float(), k_new, v_new, key_cache, value_cache, span,
                                                       scale)
    width = max(widths)
    block_tables = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for t in tables])
    query_start_loc = torch.tensor([s.query_start for s in spans] + [spans[-1].query_end], dtype=torch.int32)
    computed = torch.tensor([c for c, _ in chunks], dtype=torch.int32)
    out = torch.zeros(total, num_heads, head_dim, dtype=dtype, device=DEVICE)
    kernels.paged_prefill(q.to(DEVICE), cache.to(DEVICE), out, block_tables.to(DEVICE), query_start_loc.to(DEVICE),
                          computed.to(DEVICE), max(n for _, n in chunks), scale)
    tol = _tolerance(dtype)
    torch.testing.assert_close(out[num_decode_rows:].float().cpu(), reference[num_decode_rows:], atol=tol, rtol=tol)
    assert out[:num_decode_rows].abs().sum() == 0  # rows outside the chunks are not touched


@pytest.fixture(scope="module")
def fused():
    pytest.importorskip("triton", reason="the triton package is not installed")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton's interpreter is off")
    from tokenmill.kernels import triton_fused

    return triton_fused


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_add", [True, False])
def test_fused_add_rms_norm_matches_pytorch(fused, out_dtype, with_add):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 72, generator=gen)
    add = torch.randn(5, 72, generator=gen).to(out_dtype) if with_add else None
    weight = torch.rand(72, generator=gen) + 0.5
    expected_x = x + add.float() if with_add else x.clone()
    expected = torch.nn.functional.rms_norm(expected_x, (72,), weight, 1e-5).to(out_dtype)
    x_dev = x.to(DEVICE)
    out = fused.add_rms_norm(x_dev, None if add is None else add.to(DEVICE), weight.to(DEVICE), 1e-5, out_dtype)
    torch.testing.assert_close(x_dev.cpu(), expected_x)  # the residual stream, updated in place
    torch.testing.assert_close(out.cpu(), expected, atol=_tolerance(out_dtype), rtol=_tolerance(out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_and_mul_matches_pytorch(fused, dtype):
    gate_up = torch.randn(4, 2 * 88, generator=torch.Generator().manual_seed(3)).to(dtype)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up).to(dtype)
    out = fused.silu_and_mul(gate_up.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, atol=_tolerance(dtype), rtol=_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rotary_matches_the_layer(fused, dtype):
    """The first 5 heads of rows 40 wide (5 heads of 8) rotated in place; the rest is left alone."""
    from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary

    rotary = RotaryEmbedding(8, 64, 10000.0, None)
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(6, 56, generator=gen).to(dtype)  # 5 heads to rotate + 2 heads (v) to leave
    positions = torch.tensor([0, 3, 17, 63, 5, 5])
    cos, sin = rotary.cos[positions], rotary.sin[positions]
    full_cos = torch.cat([cos, cos], -1).unsqueeze(1)
    signed_sin = torch.cat([-sin, sin], -1).unsqueeze(1)
    expected = rows.float().clone()
    expected[:, :40] = apply_rotary(rows[:, :40].float().view(6, 5, 8), full_cos, signed_sin).reshape(6, 40)
    ours = rows.to(DEVICE)
    fused.rotary_inplace(ours, positions.to(DEVICE), rotary.cos.to(DEVICE), rotary.sin.to(DEVICE), 5, 8)
    torch.testing.assert_close(ours.float().cpu(), expected, atol=_tolerance(dtype), rtol=_tolerance(dtype))


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama3"])
def test_engine_on_triton_kernels_only_matches_transformers(arch, checkpoint, make_llm, monkeypatch):
    """Attention and every fused op in Triton (the CUDA path; here in the interpreter): greedy
    tokens equal transformers' generate, with chunked prefill and a small block size."""
    pytest.importorskip("triton", reason="the triton package is not installed")
    from helpers.checkpoints import load_reference
    from tokenmill import SamplingParams

    monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    monkeypatch.setenv("TOKENMILL_TRITON_OPS", "1")
    folder = checkpoint(arch)
    ref = load_reference(folder)
    prompts = [[1, 17, 45, 99, 3, 250, 77, 12, 13, 14, 15], [1, 300]]
    llm = make_llm(folder, dtype="float32", attention_backend="triton", block_size=4, max_num_batched_tokens=8,
                   device=DEVICE)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                do_sample=False)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected
