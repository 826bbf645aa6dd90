"""The offload placement policy (``analyze --offload``): units as the engine offloads them, the memory each
batch leaves for weights, transfer over the tier's bandwidth, overlap, and the batch with the most tokens/s."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from tokenmill.analysis.hardware import AnalysisError, custom_hardware
from tokenmill.analysis.memory import activation_bytes_per_sequence
from tokenmill.analysis.model_shape import ModelShape
from tokenmill.analysis.offload_plan import OffloadBudgets, plan_offload, weight_units
from tokenmill.analysis.roofline import phase_ops

TOY = ModelShape(name="toy", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
                 intermediate_size=128, vocab_size=1000)
LAYER = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)  # fp16: attention, SwiGLU MLP, two RMSNorms = 82,176 bytes
TABLE = 2 * 1000 * 64  # the embedding, and the untied head: 128,000 bytes each
KV_PER_SEQUENCE = 2 * 4 * 4 * 16 * 2 * (64 + 64)  # K and V, 4 layers, 4 heads of 16, fp16, 128 tokens
HW = custom_hardware(peak_tflops=1, bandwidth_gb_s=100, memory_gb=1)


def _budgets(device_memory: float, **kw) -> OffloadBudgets:
    return OffloadBudgets(**{**dict(device_memory=device_memory, cpu_memory=10**9, link_bandwidth=1e9,
                                    disk_bandwidth=1e8, device_is_cpu=False), **kw})


def test_units_are_the_engines_with_their_bytes():
    units = weight_units(TOY, "fp16")
    assert [u.name for u in units] == ["embedding", "layer 0", "layer 1", "layer 2", "layer 3", "lm_head"]
    assert [u.bytes for u in units] == [TABLE, LAYER, LAYER, LAYER, LAYER, TABLE]
    tied = weight_units(ModelShape(**{**vars(TOY), "tie_word_embeddings": True}), "fp16")
    assert tied[0].name == "embedding + lm_head" and tied[0].reads_per_step == 2 and len(tied) == 5


def test_each_batch_keeps_what_fits_and_streams_the_rest_in_the_engines_order():
    activation = activation_bytes_per_sequence(TOY, 64, "fp16")
    total = 4 * LAYER + 2 * TABLE
    # Batch 1 fits with everything resident. Batch 2 needs 245,760 more bytes (one more KV cache and
    # activations) than the 1,000 left over; offloading k layers frees only (k - 2) layers (two are in
    # flight), so all four layers and the head go (in flight: the head and a layer), freeing 246,528.
    memory = total + KV_PER_SEQUENCE + activation + 1000
    plan = plan_offload(TOY, HW, _budgets(memory), input_len=64, output_len=64)
    first, second = plan.sweep[0], plan.sweep[1]
    assert first.tier == "none" and first.resident_bytes == total and first.transfer_s == 0
    assert second.kv_cache_bytes == 2 * KV_PER_SEQUENCE and second.activation_bytes == 2 * activation
    assert second.num_offloaded_units == 5 and second.offloaded_bytes == 4 * LAYER + TABLE
    assert second.in_flight_bytes == TABLE + LAYER and second.resident_bytes == TABLE and second.tier == "cpu"
    room = memory - second.kv_cache_bytes - second.activation_bytes
    assert second.resident_bytes + second.in_flight_bytes <= room
    assert total - 4 * LAYER + 2 * LAYER > room  # the four layers alone would not do
    assert second.transfer_s == pytest.approx((4 * LAYER + TABLE) / 1e9)  # over the 1 GB/s link
    assert [p.batch_size for p in plan.sweep] == [1, 2]  # batch 4's KV cache leaves too little room


def test_on_a_gpu_the_first_units_to_stream_fill_the_cpu_tier_and_the_rest_go_to_disk():
    """The engine's SplitTier: with CPU memory for two layers, batch 2 of the case above pins layers 0 and 1
    and reads layers 2, 3 and the head from disk (at the disk's 100 MB/s, slower than the 1 GB/s link)."""
    activation = activation_bytes_per_sequence(TOY, 64, "fp16")
    memory = 4 * LAYER + 2 * TABLE + KV_PER_SEQUENCE + activation + 1000
    plan = plan_offload(TOY, HW, _budgets(memory, cpu_memory=2 * LAYER + 10), input_len=64, output_len=64)
    second = plan.sweep[1]
    assert second.tier == "cpu+disk" and second.cpu_bytes == 2 * LAYER
    assert second.transfer_s == pytest.approx(2 * LAYER / 1e9 + (2 * LAYER + TABLE) / 1e8)
    options = dataclasses.replace(plan, best=second).engine_options()  # as if batch 2 were the fastest
    assert options["max_weight_memory"] == TABLE + 1
    assert 2 * LAYER <= options["cpu_offload_gb"] * 2**30 < 3 * LAYER  # room for exactly layers 0 and 1


WIDE = ModelShape(name="wide", num_layers=8, hidden_size=256, num_heads=4, num_kv_heads=1, head_dim=64,
                  intermediate_size=1024, vocab_size=1000)  # 1.8 MiB per layer, 64 KiB of KV cache per sequence


def test_the_step_overlaps_transfer_with_compute_and_the_best_batch_wins():
    """Weights that must stream from a 5 MB/s disk: every batch moves them once per step, so up to the
    batch that crowds them out tokens/s grows with the batch (FlexGen's amortisation)."""
    budgets = dict(device_memory=8 * 2**20, cpu_memory=0, disk_bandwidth=5e6)
    plan = plan_offload(WIDE, HW, _budgets(**budgets), input_len=16, output_len=16)
    for p in plan.sweep:
        compute = phase_ops(WIDE, HW, p.batch_size, 1, 16 + 8, "fp16", "fp16", 1, "decode").time_s
        assert p.decode_compute_s == pytest.approx(compute)
        assert p.decode_step_s == pytest.approx(max(compute, p.transfer_s))
        assert p.tokens_per_s == pytest.approx(p.batch_size * 16 / (p.prefill_s + 16 * p.decode_step_s))
        assert p.tier == ("disk" if p.offloaded_bytes else "none")  # no CPU memory: the disk (5 MB/s)
    assert plan.best.tokens_per_s == max(p.tokens_per_s for p in plan.sweep)
    streaming = [p for p in plan.sweep if p.bound == "transfer"]
    assert len(streaming) >= 3  # transfer-bound: a bigger batch shares the same transfer
    assert all(b.tokens_per_s > a.tokens_per_s for a, b in zip(streaming, streaming[1:]))
    serial = plan_offload(WIDE, HW, _budgets(**budgets, prefetch=False), input_len=16, output_len=16)
    for p, q in zip(plan.sweep, serial.sweep):
        assert q.decode_step_s == pytest.approx(p.decode_compute_s + p.transfer_s)


def test_engine_options_realise_the_plan():
    cpu_plan = plan_offload(TOY, HW, _budgets(KV_PER_SEQUENCE * 8), input_len=64, output_len=64)
    options = cpu_plan.engine_options()
    assert options["max_num_seqs"] == cpu_plan.best.batch_size
    assert options["kv_cache_memory"] == cpu_plan.best.batch_size * KV_PER_SEQUENCE  # 128 tokens: whole blocks
    if cpu_plan.best.tier == "cpu":
        assert options["cpu_offload_gb"] == round(cpu_plan.best.offloaded_bytes / 2**30, 3)
    on_cpu = plan_offload(TOY, HW, _budgets(KV_PER_SEQUENCE * 8, device_is_cpu=True), input_len=64, output_len=64)
    assert on_cpu.best.tier in ("disk", "none")
    if on_cpu.best.tier == "disk":
        assert on_cpu.engine_options()["max_weight_memory"] == int(on_cpu.best.resident_bytes) + 1


def test_too_little_memory_is_explained():
    with pytest.raises(AnalysisError, match="cannot run in 0.00 GiB of device memory even with every unit offloaded"):
        plan_offload(TOY, HW, _budgets(1000), input_len=64, output_len=64)
    with pytest.raises(AnalysisError, match="disk_bandwidth must be positive"):
        _budgets(10**6, disk_bandwidth=0)


def test_cli_explains_the_choice_and_measures_it_on_the_engine(checkpoint):
    """The tiny Llama on this CPU with a budget that forces weights to disk: the engine runs the plan."""
    folder = str(checkpoint("llama"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tokenmill", "analyze", "--offload", "--model", folder,
                                     *a], capture_output=True, text=True, timeout=300)
    args = ["--hardware", "cpu", "--cpu-memory", "300KiB", "--dtype", "fp32", "--input-len", "16",
            "--output-len", "8", "--disk-bandwidth", "1"]
    text = run(*args, "--explain")
    assert text.returncode == 0, text.stderr
    assert "offload plan:" in text.stdout and "<- chosen" in text.stdout
    assert "engine options: --max-num-seqs" in text.stdout
    assert "tokens/s = batch x output / (prefill + output x step)" in text.stdout
    measured = run(*args, "--measure", folder, "--json")
    assert measured.returncode == 0, measured.stderr
    result = json.loads(measured.stdout)
    assert result["best"]["tier"] == "disk" and result["best"]["offloaded_bytes"] > 0
    m = result["measured"]
    assert m["batch_size"] == result["best"]["batch_size"] and m["measured_tokens_per_s"] > 0
    assert m["engine_options"]["max_weight_memory"] == result["engine_options"]["max_weight_memory"]
    bad = run("--hardware", "cpu", "--gpu-memory", "8GiB")
    assert bad.returncode == 2 and "--gpu-memory applies to a GPU" in bad.stderr
