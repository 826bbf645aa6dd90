"""Quantized KV caches (int8, fp8 e4m3): quantization error bounds, attention over them equal to
attention over the dequantized values on every backend, the engine's invariants, and ~2x the
tokens in the same memory."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.attention.backend import AttentionMetadata, PrefillSpan
from tokenmill.attention.kv_quant import Fp8KVCache, Int8KVCache, dequantize_rows, quantize_rows, to_fp8_bytes
from tokenmill.attention.torch_paged import TorchPagedAttention


def test_rows_round_trip_within_half_a_step():
    x = torch.randn(50, 3, 64) * torch.logspace(-2, 1, 50)[:, None, None]
    codes, scales = quantize_rows(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and codes.abs().max() <= 127
    error = (dequantize_rows(codes, scales, torch.float32) - x).abs()
    assert (error <= scales.float().unsqueeze(-1) / 2 + 1e-6).all()


def test_fp8_round_trip_keeps_three_mantissa_bits_and_saturates():
    x = torch.tensor([0.3, -1.7, 5.0, 100.0, 1000.0, -2000.0])
    back = to_fp8_bytes(x, 1.0).view(torch.float8_e4m3fn).float()
    assert ((back[:4] - x[:4]).abs() <= x[:4].abs() / 16).all()
    assert back[4].item() == 448.0 and back[5].item() == -448.0


def _round_trip(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "int8":
        return dequantize_rows(*quantize_rows(x), x.dtype)
    return to_fp8_bytes(x, 1.0).view(torch.float8_e4m3fn).float().to(x.dtype)


CACHES = {"int8": Int8KVCache, "fp8_e4m3": Fp8KVCache}


@pytest.mark.parametrize("kind", list(CACHES))
def test_attention_over_a_quantized_cache_equals_attention_over_the_dequantized_values(kind):
    """Decode and a prefill chunk with cached context, through the int8 cache, equal the same
    backend over a float cache that holds the dequantized K/V."""
    torch.manual_seed(0)
    block_size, num_blocks, nkv, nh, d = 4, 8, 2, 4, 16
    backend = TorchPagedAttention()
    int8_cache = CACHES[kind](num_blocks, block_size, nkv, d, torch.float32, torch.device("cpu"))
    float_cache = torch.zeros(2, num_blocks, block_size, nkv, d)
    # A request with 6 cached tokens in blocks [3, 5], then a step: its decode of token 7 and
    # another request's 3-token chunk after 2 cached tokens in block [1].
    history = torch.randn(2, 8, nkv, d)  # (K/V, token, nkv, d)
    slots = torch.tensor([3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2, 3 * 4 + 3, 5 * 4 + 0, 5 * 4 + 1, 1 * 4 + 0, 1 * 4 + 1])
    k_hist, v_hist = int8_cache.write(slots, history[0], history[1])
    float_cache[0].view(-1, nkv, d)[slots] = k_hist
    float_cache[1].view(-1, nkv, d)[slots] = v_hist
    q, k, v = torch.randn(4, nh, d), torch.randn(4, nkv, d), torch.randn(4, nkv, d)
    md = AttentionMetadata(
        slot_mapping=torch.tensor([5 * 4 + 2, 1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 0]), num_decodes=1,
        decode_block_tables=torch.tensor([[3, 5]]), decode_seq_lens=torch.tensor([7]), max_decode_seq_len=7,
        decode_mask=None, prefills=(PrefillSpan(1, 4, 2, torch.tensor([1, 2])),))
    ours = backend.forward(q, k, v, int8_cache, md, 0.25)
    k_rt, v_rt = _round_trip(kind, k), _round_trip(kind, v)
    reference = backend.forward(q, k_rt, v_rt, float_cache, md, 0.25)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    exact_cache = torch.zeros_like(float_cache)  # the unquantized history: int8 must differ from it, a little
    exact_cache[0].view(-1, nkv, d)[slots] = history[0]
    exact_cache[1].view(-1, nkv, d)[slots] = history[1]
    exact = backend.forward(q, k, v, exact_cache, md, 0.25)
    assert 0 < (ours - exact).abs().max() < (0.05 if kind == "int8" else 0.3)


def _prompts(n: int = 6, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.mark.parametrize("kind", list(CACHES))
def test_engine_invariants_with_a_quantized_kv_cache(kind, checkpoint, make_llm):
    folder = checkpoint("llama")
    tokens = lambda outs: [o.outputs[0].token_ids for o in outs]  # noqa: E731
    alone_llm = make_llm(folder, dtype="float32", kv_cache_dtype=kind)
    alone = [tokens(alone_llm.generate(p, GREEDY, use_tqdm=False))[0] for p in _prompts()]
    together = make_llm(folder, dtype="float32", kv_cache_dtype=kind, block_size=4, max_num_batched_tokens=7)
    assert tokens(together.generate(_prompts(), GREEDY, use_tqdm=False)) == alone  # batched, 7-token chunks
    cfg = together.engine.model_config
    row = cfg.head_dim + (2 if kind == "int8" else 0)
    tight = make_llm(folder, dtype="float32", kv_cache_dtype=kind, block_size=4,
                     kv_cache_memory=16 * 4 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * row)
    assert tokens(tight.generate(_prompts(), GREEDY, use_tqdm=False)) == alone
    assert tight.engine.core.scheduler.num_preemptions > 0
    shared = {"prompt_token_ids": _prompts()[0]["prompt_token_ids"] * 3}
    first = alone_llm.generate(shared, GREEDY, use_tqdm=False)[0]
    again = alone_llm.generate(shared, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    beams = SamplingParams(beam_width=3, n=2, max_tokens=6)
    assert len(alone_llm.generate(_prompts()[1], beams, use_tqdm=False)[0].outputs) == 2


def test_quantized_caches_hold_about_twice_the_tokens(checkpoint, make_llm, caplog):
    folder = checkpoint("llama3")  # head_dim 16: an int8 row is 16 + 2 bytes, an fp8 row 16, against 32
    fp16 = make_llm(folder, dtype="float16", kv_cache_memory="1MiB")
    int8 = make_llm(folder, dtype="float16", kv_cache_memory="1MiB", kv_cache_dtype="int8")
    fp8 = make_llm(folder, dtype="float16", kv_cache_memory="1MiB", kv_cache_dtype="fp8_e4m3")
    assert int8.engine.core.num_blocks / fp16.engine.core.num_blocks == pytest.approx(32 / 18, rel=0.01)
    assert fp8.engine.core.num_blocks / fp16.engine.core.num_blocks == pytest.approx(2, rel=0.01)
    assert "int8 with a float16 scale per token and head: 1.78x the tokens of a 16-bit cache" in caplog.text
    assert "float8 e4m3 with a per-tensor scale: 2.00x the tokens of a 16-bit cache" in caplog.text


def test_unknown_kv_cache_dtype_is_refused(checkpoint):
    from tokenmill import LLM

    with pytest.raises(ValueError, match="kv_cache_dtype 'fp4' is not supported; choose one of auto, int8, fp8_e4m3"):
        LLM(str(checkpoint("llama")), device="cpu", kv_cache_memory="8MiB", kv_cache_dtype="fp4")


@pytest.mark.parametrize("kind", list(CACHES))
def test_triton_kernels_read_quantized_caches_like_the_portable_backend(kind, checkpoint, make_llm):
    """The CUDA path (Triton's interpreter on CPU in CI): decode and chunked prefill over an int8 or
    fp8 cache give the portable backend's logprobs and tokens."""
    pytest.importorskip("triton", reason="the triton package is not installed")
    from helpers.devices import TRITON_DEVICE

    folder = checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    prompts = _prompts(3)
    results = {}
    for backend, device in (("torch", "cpu"), ("triton", TRITON_DEVICE)):
        llm = make_llm(folder, dtype="float32", kv_cache_dtype=kind, attention_backend=backend, device=device,
                       block_size=16, max_num_batched_tokens=24)  # 24: prompts in chunks, over cached context
        assert llm.engine.core.runner.backend.name == backend
        results[backend] = llm.generate(prompts, params, use_tqdm=False)
    for ours, theirs in zip(results["triton"], results["torch"]):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(ours.prompt_logprobs[1:] + ours.outputs[0].logprobs,
                        theirs.prompt_logprobs[1:] + theirs.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_kernel_reads_quantized_caches_like_the_portable_backend(kind, dtype):
    from tokenmill.attention.cpu_paged import CpuPagedAttention
    from tokenmill.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels do not build here")
    torch.manual_seed(3)
    block_size, num_blocks, nkv, nh, d = 16, 12, 3, 9, 64  # SmolLM2's heads: the specialised kernel
    cache = CACHES[kind](num_blocks, block_size, nkv, d, dtype, torch.device("cpu"))
    tables = torch.tensor([[4, 7, 1, 0], [2, 9, 11, 5]])
    lens = torch.tensor([37, 58])
    slots = torch.cat([(tables[i, :, None] * block_size + torch.arange(block_size)).flatten()[:lens[i]]
                       for i in range(2)])
    cache.write(slots, torch.randn(len(slots), nkv, d).to(dtype), torch.randn(len(slots), nkv, d).to(dtype))
    md = AttentionMetadata(slot_mapping=slots[:0], num_decodes=2, decode_block_tables=tables, decode_seq_lens=lens,
                           max_decode_seq_len=58, decode_mask=torch.arange(64)[None, None, None, :58] < lens[:, None,
                                                                                                            None, None])
    q = torch.randn(2, nh, d).to(dtype)
    ours = CpuPagedAttention()._decode(q, cache.side(0), cache.side(1), md, 0.125)
    reference = TorchPagedAttention()._decode(q, cache.side(0), cache.side(1), md, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", list(CACHES))
def test_cpu_backend_is_the_default_for_quantized_caches_on_cpu(kind, checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), dtype="float32", kv_cache_dtype=kind)
    assert llm.engine.core.runner.backend.name == "cpu"


def test_triton_int8_write_equals_the_pytorch_quantizer():
    pytest.importorskip("triton", reason="the triton package is not installed")
    from helpers.devices import TRITON_DEVICE
    from tokenmill.attention.kernels.paged_attention import write_kv_int8

    torch.manual_seed(6)
    device = torch.device(TRITON_DEVICE)
    ours = Int8KVCache(6, 4, 3, 16, torch.float32, device)
    reference = Int8KVCache(6, 4, 3, 16, torch.float32, device)
    k, v = torch.randn(5, 3, 16, device=device) * 3, torch.randn(5, 3, 16, device=device)
    slots = torch.tensor([9, 2, -1, 17, 0], device=device)  # -1: a padded row, written nowhere
    write_kv_int8(k, v, ours, slots)
    keep = slots >= 0
    reference.write(slots[keep], k[keep], v[keep])
    assert torch.equal(ours.scales, reference.scales)
    assert (ours.codes.int() - reference.codes.int()).abs().max() <= 1  # round half up vs half to even
    assert (ours.codes != reference.codes).float().mean() < 0.01


def test_an_all_zero_row_quantizes_to_zeros():
    codes, scales = quantize_rows(torch.zeros(2, 3, 8))
    assert torch.equal(codes, torch.zeros_like(codes)) and bool((scales > 0).all())
    assert torch.equal(dequantize_rows(codes, scales, torch.float32), torch.zeros(2, 3, 8))


def test_cpu_int8_write_kernel_equals_the_pytorch_quantizer():
    """The C++ write (decode-only steps) stores exactly what the PyTorch path stores."""
    from tokenmill.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels do not build here")
    torch.manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        fused, reference = (Int8KVCache(5, 4, 3, 16, dtype, torch.device("cpu")) for _ in range(2))
        k, v = (torch.randn(6, 3, 16).to(dtype) * 2 for _ in range(2))
        k[2] = 0  # an all-zero row
        slots = torch.tensor([3, 17, 8, 0, 11, 19])
        assert fused.write(slots, k, v, round_trip=False) == (k, v)
        reference.write(slots, k, v)  # the PyTorch path
        assert torch.equal(fused.codes, reference.codes) and torch.equal(fused.scales, reference.scales)
