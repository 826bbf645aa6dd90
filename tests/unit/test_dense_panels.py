"""Float weights in the panel layout (``kernels/csrc/dense_panels.cpp``): the layout round trips, the
kernel equals ``F.linear`` at every batch size and tile shape, each row's result is independent of
the batch, and linear layers choose panels only where they fit."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu_kernels
from tokenmill.layers.linear import Linear
from tokenmill.layers.quantization.packing import pack_dense_panels, unpack_dense_panels


def _kernels(dtype):
    kernels = cpu_kernels()
    if kernels is None or not kernels.dense_panels_available(dtype):
        pytest.skip(f"the C++ CPU kernels have no {dtype} panels here")
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_layout_round_trips(dtype):
    weight = torch.randn(48, 20).to(dtype)
    panels = pack_dense_panels(weight)
    assert panels.shape == ((3, 20, 16) if dtype == torch.float32 else (3, 10, 16, 2))
    assert torch.equal(unpack_dense_panels(panels), weight)
    # W[16 p + j, k] at [p, k, j] (bf16: [p, k // 2, j, k % 2]).
    stored = panels[2, 7, 5] if dtype == torch.float32 else panels[2, 3, 5, 1]
    assert stored.item() == weight[37, 7].item()
    with pytest.raises(ValueError, match="outputs divisible by 16"):
        pack_dense_panels(torch.randn(40, 20).to(dtype))


# 16 outputs: 1-panel tiles; 48: a 3-panel tile; 80: 4 + 1; 1536: many tiles over both threads.
@pytest.mark.parametrize("out_features", [16, 48, 80, 1536])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 7, 100, 200])  # 1-2: wide tiles; 6-row tiles and tails; row chunks
def test_float32_panels_equal_f_linear(out_features, num_rows):
    kernels = _kernels(torch.float32)
    torch.manual_seed(0)
    weight, bias = torch.randn(out_features, 136), torch.randn(out_features)  # 136 inputs: a partial sum block
    x = torch.randn(num_rows, 136)
    panels = pack_dense_panels(weight)
    got = kernels.dense_panel_linear(x, panels, bias)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.dense_panel_linear(x, panels, None), F.linear(x, weight), atol=2e-5, rtol=1e-5)
    # Each row's result is independent of the other rows, bit for bit.
    assert torch.equal(kernels.dense_panel_linear(x[-1:], panels, bias), got[-1:])


@pytest.mark.parametrize("num_rows", [1, 3, 100])
def test_bf16_panels_equal_float32_products_rounded_once(num_rows):
    """bf16 in, float32 sums (exact products of bf16 pairs), one rounding to bf16 at the end."""
    kernels = _kernels(torch.bfloat16)
    torch.manual_seed(1)
    weight, bias = torch.randn(80, 136).bfloat16(), torch.randn(80).bfloat16()
    x = torch.randn(num_rows, 136).bfloat16()
    got = kernels.dense_panel_linear(x, pack_dense_panels(weight), bias)
    assert got.dtype == torch.bfloat16
    exact = F.linear(x.float(), weight.float(), bias.float())
    # Within one bf16 rounding of the float32 result (plus float32 summation noise).
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()
    assert torch.equal(kernels.dense_panel_linear(x[:1], pack_dense_panels(weight), bias), got[:1])


@pytest.mark.parametrize("num_rows", [1, 2])
def test_every_panel_is_computed_once_whatever_the_thread_count(num_rows):
    """At 1-2 rows the threads claim tiles from their own share and take the rest from the end of the
    others' (work stealing): with 1, 2 or 3 threads every output is computed, with the same bits, for
    float panels and for 8- and 4-bit quantized ones (100 panels: shares of 33-34)."""
    from tokenmill.layers.quantization.quantized_matrix import QuantizedMatrix
    from tokenmill.layers.quantization.rtn import quantize_rtn

    kernels = _kernels(torch.bfloat16)
    torch.manual_seed(2)
    weight = torch.randn(1600, 256) * 0.05
    x = torch.randn(num_rows, 256).bfloat16()
    products = {"bf16": lambda: kernels.dense_panel_linear(x, pack_dense_panels(weight.bfloat16()), None)}
    if kernels.quant_panels_available():
        for bits in (8, 4):
            matrix = QuantizedMatrix(*quantize_rtn(weight, bits, 64, sym=False), bits, 64, int8_activations=True)
            assert matrix.panels
            products[f"int{bits}"] = lambda matrix=matrix: matrix(x)
    threads = torch.get_num_threads()
    try:
        results = {}
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for name, product in products.items():
                results.setdefault(name, []).append(product())
    finally:
        torch.set_num_threads(threads)
    for name, (one, two, three) in results.items():
        assert torch.isfinite(one.float()).all(), name
        assert torch.equal(one, two) and torch.equal(one, three), name


def test_kernel_refuses_mismatched_inputs():
    kernels = _kernels(torch.float32)
    panels = pack_dense_panels(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="dense panels hold 64 inputs; x has 48"):
        kernels.dense_panel_linear(torch.randn(2, 48), panels, None)
    with pytest.raises(RuntimeError, match="bias has 31 values for 32 outputs"):
        kernels.dense_panel_linear(torch.randn(2, 64), panels, torch.randn(31))


def _processed(out_features: int, dtype: torch.dtype) -> Linear:
    layer = Linear(64, out_features).to(dtype)
    layer.weight.data.copy_(torch.randn(out_features, 64))
    layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_layers_hold_panels_where_they_fit(dtype, monkeypatch):
    _kernels(dtype)
    layer = _processed(48, dtype)
    assert layer.weight is None and layer.packed_weight.layout == torch.strided and layer.packed_weight.dim() >= 3
    x = torch.randn(3, 64).to(dtype)
    expected = F.linear(x.float(), unpack_dense_panels(layer.packed_weight).float())
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)
    assert layer.read_bytes() == 48 * 64 * torch.empty((), dtype=dtype).element_size()
    # 40 outputs do not fill panels of 16: oneDNN's prepacked layout where oneDNN runs the dtype fast (bf16:
    # AVX512-BF16 or AMX), else the plain weight.
    onednn = dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    unfit = _processed(40, dtype)
    assert unfit.packed_weight.layout == torch._mkldnn if onednn else unfit.packed_weight is None
    monkeypatch.setenv("TOKENMILL_NO_DENSE_PANELS", "1")
    layer = _processed(48, dtype)
    assert layer.packed_weight.layout == torch._mkldnn if onednn else layer.packed_weight is None


def test_every_cpu_with_avx2_has_the_panel_kernels():
    """AVX2 (two 256-bit halves per panel vector, simd16.h) is enough for float32, bf16 and quantized
    panels: CPUs without AVX-512 get the same kernels instead of PyTorch's scalar fallbacks."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        pytest.skip("not an x86 CPU with AVX2, FMA and F16C (or no /proc/cpuinfo)")
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the C++ CPU kernels are not built here")
    assert kernels.dense_panels_available(torch.float32) and kernels.dense_panels_available(torch.bfloat16)
    assert kernels.quant_panels_available()


def test_the_kernels_are_built_under_a_name_for_this_cpu(monkeypatch):
    """The build uses -march=native: its name carries a digest of the CPU's flags, so a cached build from
    another kind of CPU (AVX-512 code on an AVX2 machine) is never loaded."""
    from tokenmill import kernels as kernel_module

    built = cpu_kernels()
    if built is None:
        pytest.skip("the C++ CPU kernels are not built here")
    assert built.__name__ == f"tokenmill_cpu_kernels_{kernel_module._cpu_tag()}"

    def tag_for(flags: str) -> str:
        with monkeypatch.context() as patch:
            patch.setattr("builtins.open", lambda path, *a, **k: io.StringIO(f"flags\t\t: {flags}\n"))
            return kernel_module._cpu_tag()

    assert tag_for("fpu sse2 avx2 fma f16c") != tag_for("fpu sse2 avx2 fma f16c avx512f avx512bw")
