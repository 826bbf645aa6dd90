"""Quantized weights: packing round trips, round-to-nearest grids, and the CPU kernel against the
reference formula ``scale * (q - zero)`` on every path (exact float, int8 activations, panels)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels import cpu_kernels
from tokenmill.layers.quantization.config import QuantizationConfig
from tokenmill.layers.quantization.packing import (pack_int32, pack_nibbles, pack_panels, unpack_int32,
                                                    unpack_nibbles, unpack_panels)
from tokenmill.layers.quantization.quantized_matrix import QuantizedMatrix
from tokenmill.layers.quantization.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_packing_round_trips_codes(bits, dim):
    codes = torch.randint(0, 2**bits, (64, 48), dtype=torch.int32)
    packed = pack_int32(codes, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == codes.shape[dim] * bits // 32
    assert torch.equal(unpack_int32(packed, bits, dim), codes)


def test_int32_packing_puts_the_first_code_in_the_lowest_bits():
    codes = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]], dtype=torch.int32)  # (K=8, N=1)
    assert pack_int32(codes, 4, dim=0).item() == int("0xF7654321", 16) - 2**32


def test_nibble_layout_round_trips_and_pairs_inputs_16_apart():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 48)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert packed[2, 3].item() == codes[2, 3].item() | (codes[2, 19].item() << 4)


@pytest.mark.parametrize("bits, group_size, sym", [(8, -1, True), (4, 32, False), (4, 64, False), (4, -1, True)])
def test_round_to_nearest_codes_and_error(bits, group_size, sym):
    weight = torch.randn(16, 128)
    codes, scales, zeros = quantize_rtn(weight, bits, group_size, sym)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    size = 128 if group_size == -1 else group_size
    restored = scales.repeat_interleave(size, 1) * (codes - zeros.repeat_interleave(size, 1))
    # Round to nearest: every weight within half a step of its grid point.
    assert ((restored - weight).abs() <= scales.repeat_interleave(size, 1) / 2 + 1e-6).all()
    if sym:
        assert (zeros == 2 ** (bits - 1)).all()


SHAPES = [  # (bits, group_size, in_features): packed 4-bit, one-per-byte 4-bit, 8-bit with tails
    (8, -1, 576), (8, 32, 128), (8, -1, 200), (4, 64, 576), (4, 32, 96), (4, -1, 128), (4, 16, 48), (4, -1, 172)]


@pytest.fixture(params=["kernels", "portable"])
def kernel_mode(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    elif cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels do not build here")
    return request.param


@pytest.mark.parametrize("bits, group_size, in_features", SHAPES)
@pytest.mark.parametrize("num_rows", [1, 3, 5, 40])  # tiles of 1-4 rows; 40: the dequantize-and-GEMM path
def test_float32_matmul_equals_the_reference_formula(bits, group_size, in_features, num_rows, kernel_mode):
    torch.manual_seed(0)
    weight = torch.randn(37, in_features) * 0.05  # 37 outputs: a partial tile of rows
    codes, scales, zeros = quantize_rtn(weight, bits, group_size, sym=False)
    matrix = QuantizedMatrix(codes, scales, zeros, bits, group_size)
    size = in_features if group_size == -1 else group_size
    reference = scales.repeat_interleave(size, 1) * (codes - zeros.repeat_interleave(size, 1))
    torch.testing.assert_close(matrix.dequantize(), reference, atol=1e-6, rtol=1e-6)
    x = torch.randn(num_rows, in_features)
    bias = torch.randn(37)
    torch.testing.assert_close(matrix(x, bias), x @ reference.T + bias, atol=2e-5, rtol=1e-5)


def test_act_order_permutation_is_applied_to_the_inputs(kernel_mode):
    torch.manual_seed(1)
    codes, scales, zeros = quantize_rtn(torch.randn(8, 64), 4, 32, sym=False)
    perm = torch.randperm(64)
    matrix = QuantizedMatrix(codes, scales, zeros, 4, 32, perm=perm)
    stored = scales.repeat_interleave(32, 1) * (codes - zeros.repeat_interleave(32, 1))  # inputs in perm order
    original = torch.empty_like(stored)
    original[:, perm] = stored
    x = torch.randn(2, 64)
    torch.testing.assert_close(matrix.dequantize(), original)
    torch.testing.assert_close(matrix(x), x @ original.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits, group_size", [(8, -1), (4, 64), (4, 128)])
def test_bf16_activations_take_int8_dot_products_within_their_rounding(bits, group_size):
    """bf16 models multiply with int8-quantized activations (blocks of 64) where the CPU has
    AVX512-VNNI: a relative error of ~0.5%, the size of int8 rounding, never more."""
    if cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels do not build here")
    torch.manual_seed(2)
    codes, scales, zeros = quantize_rtn(torch.randn(64, 256) * 0.05, bits, group_size, sym=bits == 8)
    matrix = QuantizedMatrix(codes, scales, zeros, bits, group_size)
    for num_rows in (1, 4, 7):
        x = torch.randn(num_rows, 256).bfloat16()
        exact = x.float() @ matrix.dequantize().T
        got = matrix(x).float()
        assert got.dtype == torch.float32 and matrix(x).dtype == torch.bfloat16
        assert ((got - exact).norm() / exact.norm()).item() < 0.015


def test_quantization_config_errors_name_the_value():
    with pytest.raises(ValueError, match="int4 quantization_group_size 48 is not supported"):
        QuantizationConfig.load_time("int4", 48)
    with pytest.raises(ValueError, match="quantization 'int3' is not supported"):
        QuantizationConfig.load_time("int3")
    with pytest.raises(ValueError, match="int8 quantization is per output channel"):
        QuantizationConfig.load_time("int8", 64)


def _triton_matrix(monkeypatch, out_features: int, in_features: int, bits: int, group_size: int, seed: int):
    """A random RTN QuantizedMatrix on the device the Triton path runs on (CPU: its interpreter), and that device."""
    pytest.importorskip("triton", reason="the triton package is not installed")
    from helpers.devices import TRITON_DEVICE

    if TRITON_DEVICE == "cpu":
        monkeypatch.setenv("TOKENMILL_TRITON_OPS", "1")
    torch.manual_seed(seed)
    codes, scales, zeros = quantize_rtn(torch.randn(out_features, in_features) * 0.05, bits, group_size, sym=False)
    return QuantizedMatrix(codes, scales, zeros, bits, group_size).to(TRITON_DEVICE), TRITON_DEVICE


@pytest.mark.parametrize("bits, group_size, in_features", [  # per-element scales, then one scale per tile
    (8, -1, 96), (8, 32, 96), (4, 32, 64), (4, -1, 96), (8, 64, 128), (4, 64, 192), (4, 128, 256), (4, -1, 128)])
@pytest.mark.parametrize("num_rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_the_reference_formula(bits, group_size, in_features, num_rows, dtype, monkeypatch):
    """The CUDA path, run by Triton's interpreter on CPU tensors (fp32 and fp16: no bf16 dots there)."""
    matrix, device = _triton_matrix(monkeypatch, 70, in_features, bits, group_size, seed=4)
    assert matrix.storage_bits == bits  # the packed 4-bit layout is the one under test
    x = torch.randn(num_rows, in_features, device=device).to(dtype)
    bias = torch.randn(70, device=device).to(dtype)
    reference = x.float() @ matrix.dequantize().T + bias.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(matrix(x, bias).float(), reference, atol=tol, rtol=tol)


@pytest.mark.parametrize("config", [
    dict(block_m=16, block_n=16, block_k=32, split_k=2), dict(block_m=16, block_n=32, block_k=64, split_k=3),
    dict(block_m=1, block_n=16, block_k=32, use_dot=False), dict(block_m=2, block_n=32, block_k=64, split_k=2,
                                                                  use_dot=False)])
@pytest.mark.parametrize("bits, group_size, in_features", [(8, -1, 192), (4, 32, 192), (4, 64, 256), (8, 64, 128)])
def test_triton_kernel_tilings_give_the_reference_formula(config, bits, group_size, in_features, monkeypatch):
    """Decode tilings: inputs split across programs (float32 partial sums added in order, the bias
    once) and the multiply-and-sum form for a few rows, against the formula; splits that do not
    divide the inputs evenly (3 splits of 192 inputs in tiles of 64) included."""
    matrix, device = _triton_matrix(monkeypatch, 48, in_features, bits, group_size, seed=5)
    from tokenmill.kernels.triton_quant_linear import QuantLinearConfig, quant_linear

    x = torch.randn(3, in_features, device=device)
    bias = torch.randn(48, device=device)
    reference = x @ matrix.dequantize().T + bias
    for with_bias in (bias, None):
        got = quant_linear(x, matrix.codes, matrix.scales, matrix.scaled_zeros, matrix.group_size, bits, with_bias,
                           QuantLinearConfig(**config))
        want = reference if with_bias is not None else reference - bias
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_panel_layout_round_trips_and_holds_16_outputs_by_4_inputs():
    codes = torch.randint(0, 256, (32, 128), dtype=torch.int16)
    panels = pack_panels(codes, 8)
    assert panels.shape == (2, 32, 16, 4) and panels.dtype == torch.uint8
    assert torch.equal(unpack_panels(panels, 8), codes)
    # Output 16 p + j, input 4 k4 + i at [p, k4, j, i].
    assert panels[1, 5, 3, 2].item() == codes[19, 22].item()


def test_4_bit_panels_hold_8_inputs_per_byte_pair_of_nibbles():
    codes = torch.randint(0, 16, (32, 128), dtype=torch.int16)
    panels = pack_panels(codes, 4)
    assert panels.shape == (2, 16, 16, 4)
    assert torch.equal(unpack_panels(panels, 4), codes)
    # Output 16 p + j: input 8 k8 + i in the low nibble of [p, k8, j, i], 8 k8 + 4 + i in the high one.
    byte = panels[1, 2, 3, 1].item()
    assert byte & 0xF == codes[19, 17].item() and byte >> 4 == codes[19, 21].item()


def _panels_or_skip():
    kernels = cpu_kernels()
    if kernels is None or not kernels.quant_panels_available():
        pytest.skip("the C++ CPU kernels have no panel path here (they need AVX2 or AVX-512)")


def _int8_activation_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 64 inputs (scale max|x_b| / 127, round half to even), times the
    float weight: what the panel kernel computes, up to float32 summation order."""
    rows, in_features = x.shape
    blocks = x.float().view(rows, in_features // 64, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    rounded = torch.round(blocks * inverse) * (amax / 127.0)
    return rounded.view(rows, in_features) @ weight.T


@pytest.mark.parametrize("bits, group_size, sym, out_features", [
    (8, -1, True, 48), (8, 64, True, 80), (8, 128, False, 64), (8, -1, False, 16), (4, 64, False, 48), (4, 128, False, 80),
    (4, -1, True, 16), (4, 32, False, 48), (8, 32, True, 32)])  # groups of 32: two per activation block
@pytest.mark.parametrize("num_rows", [1, 2, 3, 7, 64, 200])  # 3-4-panel tiles, 6-row tiles and their tails, row chunks
def test_panel_kernel_equals_int8_rounded_activations_times_the_weight(bits, group_size, sym, out_features, num_rows):
    """8- and 4-bit codes of a bf16 model in the panel layout: every batch size multiplies int8
    activations (blocks of 64) by the codes, and equals that rounding applied in float, zero points
    included."""
    _panels_or_skip()
    torch.manual_seed(5)
    codes, scales, zeros = quantize_rtn(torch.randn(out_features, 256) * 0.05, bits, group_size, sym=sym)
    matrix = QuantizedMatrix(codes, scales, zeros, bits, group_size, int8_activations=True)
    row_layout = QuantizedMatrix(codes, scales, zeros, bits, group_size)
    assert matrix.panels and not row_layout.panels
    # Panels hold the scales in float16 (in units of a power of two): scale16 * unit * (code - zero) exactly,
    # within float16's rounding (2**-11) of the float32-scaled weight.
    group = 256 if group_size == -1 else group_size
    scales16 = (scales / matrix.scale_unit).half().float() * matrix.scale_unit
    reference = scales16.repeat_interleave(group, 1) * (codes.float() - zeros.repeat_interleave(group, 1))
    torch.testing.assert_close(matrix.dequantize(), reference, atol=0, rtol=0)
    torch.testing.assert_close(matrix.dequantize(), row_layout.dequantize(), atol=1e-7, rtol=2 ** -11)
    # float32 in: no bf16 rounding of the output, and no ties (x * 127 / max exactly k + 0.5, common
    # with bf16 inputs), which the kernel's fast reciprocal may round the other way.
    x = torch.randn(num_rows, 256)
    expected = _int8_activation_reference(x, matrix.dequantize())
    got = matrix(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for half in (torch.bfloat16, torch.float16):  # read and written in 16 bits: rounded as Tensor.to rounds
        x16 = x.to(half)
        assert torch.equal(matrix(x16), matrix(x16.float()).to(half))
    # Each row's result is independent of the others in the batch, bit for bit.
    torch.testing.assert_close(matrix(x[-1:]), got[-1:], atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_panel_kernel_is_exact_at_the_ends_of_the_code_range(bits):
    """Codes at both ends of their range against activations that round to +-127: the byte products whose
    pair sums overflow int16 (2 * 255 * 127 > 32767), where CPUs without VNNI multiply bytes through
    vpmaddubsw (simd16.h), come out exact."""
    _panels_or_skip()
    top = 2**bits - 1
    codes = torch.zeros(32, 256, dtype=torch.int64)
    codes[:16] = top                    # outputs 0-15: the largest code everywhere
    codes[16:, ::2] = top               # outputs 16-31: alternating ends
    scales, zeros = torch.full((32, 4), 0.01), torch.zeros(32, 4)
    zeros[:, 1] = top // 2 + 1          # a zero point mid-range in one group
    matrix = QuantizedMatrix(codes, scales, zeros, bits, 64, int8_activations=True)
    assert matrix.panels
    x = torch.ones(2, 256)  # every block rounds to +127 (row 0) or, alternating sign, +-127 (row 1)
    x[1, 1::2] = -1.0
    expected = x @ matrix.dequantize().T
    torch.testing.assert_close(matrix(x), expected, atol=1e-4, rtol=1e-5)


def test_panels_hold_float16_scales_in_a_power_of_two_unit_and_byte_zero_points():
    """3 bytes per group and output beside the codes; scales beyond float16's normal range (1e-5 to 1e3
    here, where float16 alone would flush the small ones to subnormals or zero) keep 11 significant bits."""
    _panels_or_skip()
    torch.manual_seed(6)
    codes, _, zeros = quantize_rtn(torch.randn(32, 256), 4, 64, sym=False)
    scales = torch.logspace(-5, 3, 32 * 4).view(32, 4)
    matrix = QuantizedMatrix(codes, scales, zeros, 4, 64, int8_activations=True)
    assert matrix.panels and matrix.scales.dtype == torch.float16 and matrix.zeros.dtype == torch.uint8
    assert matrix.nbytes() == 32 * 256 // 2 + 32 * 4 * 3
    assert matrix.scale_unit == 2.0 ** (9 - 13)  # the largest scale, 1000, lies in [2**9, 2**10)
    exact = QuantizedMatrix(codes, scales, zeros, 4, 64).dequantize()
    torch.testing.assert_close(matrix.dequantize(), exact, atol=0, rtol=2 ** -11)
    x = torch.randn(3, 256)
    torch.testing.assert_close(matrix(x), _int8_activation_reference(x, matrix.dequantize()), atol=1e-5, rtol=1e-4)


def test_panels_only_where_they_fit():
    """float32 models, and shapes or groups the panels cannot hold keep the row layout."""
    _panels_or_skip()
    codes8, scales, zeros = quantize_rtn(torch.randn(40, 128), 8, -1, sym=True)  # 40 outputs: not 16s
    assert not QuantizedMatrix(codes8, scales, zeros, 8, -1, int8_activations=True).panels
    codes8, scales, zeros = quantize_rtn(torch.randn(32, 96), 8, 32, sym=True)  # 96 inputs: not 64s
    assert not QuantizedMatrix(codes8, scales, zeros, 8, 32, int8_activations=True).panels
    codes4, scales, zeros = quantize_rtn(torch.randn(32, 192), 4, 96, sym=False)  # groups of 96: not 32 or 64s
    assert not QuantizedMatrix(codes4, scales, zeros, 4, 96, int8_activations=True).panels
    codes4, scales, zeros = quantize_rtn(torch.randn(32, 128), 4, 32, sym=False)  # groups of 32 fit (two a block)
    assert QuantizedMatrix(codes4, scales, zeros, 4, 32, int8_activations=True).panels
    codes8, scales, zeros = quantize_rtn(torch.randn(32, 128), 8, -1, sym=True)
    assert not QuantizedMatrix(codes8, scales, zeros, 8, -1).panels
