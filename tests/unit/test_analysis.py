"""tokenmill analyze: the seed's worked numbers, exact parameter counts, roofline claims, bad input."""

from __future__ import annotations

import json

import pytest

from helpers.checkpoints import ARCHITECTURES, MOE_ARCHITECTURES
from tokenmill.analysis import HARDWARE, MODEL_PRESETS, analyze, get_hardware, get_model_shape
from tokenmill.analysis.hardware import AnalysisError
from tokenmill.analysis.memory import simple_kv_bytes, simple_weight_bytes

GiB, TiB = 2 ** 30, 2 ** 40


def test_seed_opt_175b_memory():
    opt = MODEL_PRESETS["opt-175b"]
    assert simple_weight_bytes(opt) / GiB == pytest.approx(325, rel=0.01)  # the seed's "about 325G"
    assert simple_kv_bytes(opt, 512, 512, 32) / TiB == pytest.approx(1.2, rel=0.01)  # "about 1.2T"
    assert opt.total_params() / 1e9 == pytest.approx(175, rel=0.01)


def test_seed_a10_peaks_from_cores_and_clocks():
    a10 = HARDWARE["a10"]
    assert a10.cuda_core_fp32_flops / 1e12 == pytest.approx(31.2, abs=0.05)  # 2 x 9216 x 1.695 GHz
    assert a10.bus_bandwidth / 1e9 == pytest.approx(600, abs=1)  # 6251 MHz x 384 bit x 2 / 8
    assert a10.flops("fp32") == a10.cuda_core_fp32_flops


def test_seed_v100_ops_per_byte():
    v100 = HARDWARE["v100"]
    assert v100.ridge_point("fp16") == pytest.approx(139, abs=1)  # 125 TFLOPS / ~900 GB/s HBM
    assert v100.flops("fp16") / v100.l2_bandwidth == pytest.approx(40, abs=1)  # against 3.1 TB/s L2


@pytest.mark.parametrize("arch", ARCHITECTURES + MOE_ARCHITECTURES)
def test_exact_params_equal_checkpoint_tensor_sizes(arch, checkpoint):
    from safetensors import safe_open

    folder = checkpoint(arch)
    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if not name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2 mask buffers, not parameters
                total += _numel(f.get_slice(name).get_shape())
    assert get_model_shape(str(folder)).total_params() == total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_decode_memory_bound_prefill_compute_bound_on_a100():
    report = analyze("llama-2-7b", "a100-80gb", batch_size=1, input_len=512, output_len=128)
    assert all(op.bound == "memory" for op in report.decode.ops if op.kind == "linear")
    assert all(op.bound == "compute" for op in report.prefill.ops if op.kind == "linear" and op.name != "lm_head")


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_elementwise_and_softmax_always_memory_bound(batch):
    report = analyze("llama-3-8b", "a100-80gb", batch_size=batch, input_len=512, output_len=64)
    for phase in (report.prefill, report.decode):
        for op in phase.ops:
            if op.kind == "elementwise":
                assert op.bound == "memory", (phase.name, op.name)


def test_batch_sweep_trades_latency_for_throughput():
    sweep = analyze("llama-2-7b", "a100-80gb", batch_size=1).sweep
    assert len(sweep) >= 5
    for a, b in zip(sweep, sweep[1:]):
        assert b.ms_per_token >= a.ms_per_token and b.tokens_per_s > a.tokens_per_s
    for p in sweep:
        assert p.latency_s == pytest.approx(p.batch_size * 128 / p.tokens_per_s)


def test_moe_reads_fewer_expert_weights_at_batch_one():
    report = analyze("mixtral-8x7b", "h200", batch_size=1, input_len=128, output_len=16)
    shape = MODEL_PRESETS["mixtral-8x7b"]
    assert shape.active_params_per_token() < shape.total_params() / 3
    experts = [op for op in report.decode.ops if op.name.startswith("experts.")]
    read = sum(op.bytes for op in experts)
    assert read < 0.3 * 3 * 8 * 4096 * 14336 * 2  # 2 of 8 experts' weights, not all


def test_tensor_parallel_splits_weights_and_time():
    one = analyze("llama-2-70b", "h100-sxm", batch_size=1, tp=2)
    four = analyze("llama-2-70b", "h100-sxm", batch_size=1, tp=4)
    assert four.decode_time_s < one.decode_time_s / 1.8
    assert one.cluster is None and analyze("llama-2-70b", "h100-sxm", batch_size=1, tp=1).cluster.num_devices == 2


def test_the_report_gives_the_all_reduce_traffic_per_token_at_tp2():
    from tokenmill.analysis.report import text_report

    report = analyze("llama-3.2-1b", "a10", batch_size=1, tp=2)
    # 16 layers x 2 all-reduces x a 2048-wide fp16 vector x 2 (tp - 1) / tp = 131,072 bytes
    assert "all-reduce traffic per generated token and device 131.07 kB" in text_report(report)


def test_a_configuration_beyond_one_device_gets_the_smallest_tensor_x_pipeline_layout():
    """The seed's OPT-175B example (batch 512, 512 in, 32 out: ~325 GB of weights, ~1.2 TB of KV
    cache) on A10s: the fullest device of the layout, worked out by hand, fits; one stage fewer does not."""
    report = analyze("opt-175b", "a10", batch_size=512, input_len=512, output_len=32)
    gib = 2**30
    assert report.memory.weight_bytes / gib == pytest.approx(325, rel=0.01)
    assert report.memory.kv_cache_bytes / gib == pytest.approx(1224, rel=0.001)  # 2*96*12288*544*512*2 bytes
    plan = report.cluster
    assert (plan.tp, plan.pp) == (8, 20) and report.tp == 8

    def fullest(pp: int) -> float:  # ceil(96 / pp) layers; OPT's embedding is tied, so one table at either end
        layers, embedding = -(-96 // pp), 50272 * 12288 * 2
        layer_weights = (report.memory.weight_bytes - embedding) / 96
        kv = report.memory.kv_cache_bytes / 96 * layers
        return (layer_weights * layers + embedding + kv + report.memory.activation_bytes) / 8

    device = report.hardware.memory_bytes
    assert plan.per_device_bytes == pytest.approx(fullest(20)) and fullest(20) <= device < fullest(19)
    assert plan.allreduce_bytes_per_token == 96 * 2 * (12288 * 2) * 2 * 7 / 8  # ring: 2 (tp-1)/tp of each
    assert plan.pipeline_bytes_per_token == 19 * 2 * 12288 * 2


def test_bad_input_is_named():
    with pytest.raises(AnalysisError, match=r"unknown hardware 'b200'; known: a10, t4, .*cpu"):
        get_hardware("b200")
    with pytest.raises(AnalysisError, match=r"unknown model 'gpt-5'.*opt-175b"):
        get_model_shape("gpt-5")
    with pytest.raises(AnalysisError, match=r"does not fit: it needs .* GiB .* no layout of up to tp 8 x pp 96 t4"):
        analyze("opt-175b", "t4", batch_size=4096, input_len=2048, output_len=32)
    with pytest.raises(AnalysisError, match="unknown dtype 'fp12'"):
        analyze("gpt2", "a10", dtype="fp12")
    with pytest.raises(AnalysisError, match="batch_size must be a positive integer"):
        analyze("gpt2", "a10", batch_size=0)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(AnalysisError, match="malformed model config, missing 'num_attention_heads'"):
        get_model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(AnalysisError, match="not valid JSON"):
        get_model_shape(str(tmp_path))


def test_cli_json_explain_and_plot(tmp_path):
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "tokenmill", "analyze", *a], capture_output=True,
                                    text=True, timeout=120)
    out = run("--model", "opt-175b", "--hardware", "a100-80gb", "--batch-size", "4", "--input-len", "512",
              "--output-len", "32", "--tp", "8", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["memory"]["fits"] and data["predicted"]["ms_per_output_token"] > 0
    explained = run("--model", "llama-2-7b", "--hardware", "a10", "--explain", "--batch-size", "2", "--plot",
                    str(tmp_path / "roof.png"))
    assert explained.returncode == 0, explained.stderr
    assert "2 x 9216 x 1.695 GHz = 31.2 TFLOPS" in explained.stdout
    assert "6251 MHz x 384 bit x 2 / 8 = 600 GB/s" in explained.stdout
    assert (tmp_path / "roof.png").stat().st_size > 10_000
    bad = run("--model", "llama-2-7b", "--hardware", "tpu-v9")
    assert bad.returncode == 2 and "unknown hardware 'tpu-v9'" in bad.stderr


def test_measure_runs_the_engine_beside_the_prediction(checkpoint):
    import subprocess
    import sys

    folder = str(checkpoint("llama"))
    out = subprocess.run([sys.executable, "-m", "tokenmill", "analyze", "--model", folder, "--hardware", "cpu",
                          "--dtype", "fp32", "--batch-size", "2", "--input-len", "16", "--output-len", "8",
                          "--measure", folder, "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)["measured"]
    assert measured["measured_ms_per_token"] > 0 and measured["predicted_ms_per_token"] > 0
    assert measured["ms_per_token_ratio"] == pytest.approx(
        measured["measured_ms_per_token"] / measured["predicted_ms_per_token"])


def test_quantized_weights_on_a_cpu_with_panels_count_float16_scales_and_byte_zeros():
    """`Hardware.quant_panels` (set by the measured `cpu` preset where the panel kernels exist) counts 3
    bytes per group and output where the shape takes panels, 8 elsewhere: smollm2-135m int4 (groups
    of 64; every matrix takes panels, the head int8 in groups of 64) holds 8.3 + 2.2 MB less."""
    from dataclasses import replace

    from tokenmill.analysis.hardware import measure_cpu
    from tokenmill.kernels import cpu_kernels

    shape, a100 = get_model_shape("smollm2-135m"), get_hardware("a100-80gb")
    rows = analyze(shape, a100, dtype="int4").memory.weight_bytes
    panels = analyze(shape, replace(a100, quant_panels=True), dtype="int4").memory.weight_bytes
    layers = shape.num_layers * sum(n * k // 64 for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536)))
    assert rows - panels == 5 * (layers + shape.vocab_size * shape.hidden_size // 64)
    kernels = cpu_kernels()
    assert measure_cpu().quant_panels == (kernels is not None and kernels.quant_panels_available())
