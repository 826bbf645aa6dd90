"""Text tables and the ``--explain`` derivations for an AnalysisReport."""

from __future__ import annotations

from tokenmill.analysis.analyzer import AnalysisReport
from tokenmill.analysis.cluster import allreduce_bytes_per_token
from tokenmill.analysis.roofline import Phase

GiB = 2 ** 30


def _fmt(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def phase_table(phase: Phase, ridge: float) -> str:
    lines = [f"{phase.name}: batch {phase.batch_size}, {phase.num_tokens} new tokens, context {phase.context_len} "
             f"(ridge point {ridge:.0f} ops/byte)",
             f"  {'operator':<20} {'x':>3} {'FLOPs':>11} {'bytes':>11} {'ops/byte':>9} {'bound':>8} {'time':>11}"]
    for op in phase.ops:
        lines.append(f"  {op.name:<20} {op.count:>3} {_fmt(op.flops):>11} {_fmt(op.bytes, 'B'):>11} "
                     f"{op.intensity:>9.1f} {op.bound:>8} {op.time_s * 1e6 * op.count:>9.1f} us")
    lines.append(f"  {'total':<20} {'':>3} {_fmt(phase.flops):>11} {_fmt(phase.bytes, 'B'):>11} {'':>9} {'':>8} "
                 f"{phase.time_s * 1e3:>9.3f} ms")
    return "\n".join(lines)


def _cluster_lines(r: AnalysisReport) -> list[str]:
    c = r.cluster
    if c is None:
        if r.tp == 1:
            return []
        traffic = allreduce_bytes_per_token(r.model, r.tp, r.dtype)
        return [f"tensor parallel x{r.tp}: all-reduce traffic per generated token and device "
                f"{_fmt(traffic, 'B')} (2 per layer, ring)"]
    return ["", f"does not fit one {r.hardware.name}: the smallest layout that holds it is tp {c.tp} x pp {c.pp} = "
                f"{c.num_devices} x {r.hardware.name}",
            f"  per device {c.per_device_bytes / GiB:.1f} GiB of {c.device_memory_bytes / GiB:.1f} (its layers' weights "
            f"and KV cache, embedding or head, activations)",
            f"  traffic per generated token and device: all-reduce {_fmt(c.allreduce_bytes_per_token, 'B')} "
            f"(2 per layer, ring), pipeline {_fmt(c.pipeline_bytes_per_token, 'B')} (stage boundaries)",
            f"  the tables below are per device at tp {c.tp}"]


def text_report(r: AnalysisReport) -> str:
    m, hw = r.memory, r.hardware
    compute = "fp32" if r.dtype == "fp32" else "fp16"
    out = [f"{r.model.name} on {hw.name} x{r.tp}: batch {r.batch_size}, input {r.input_len}, output {r.output_len}, "
           f"weights {r.dtype}, KV cache {r.kv_dtype}",
           f"parameters: {r.model.total_params() / 1e9:.3f} B"
           + (f" ({r.model.active_params_per_token() / 1e9:.2f} B active per token)" if r.model.is_moe else ""),
           f"peaks: {_fmt(hw.flops(compute), 'FLOP/s')} ({compute}), {_fmt(hw.bandwidth, 'B/s')}, "
           f"ridge point {hw.ridge_point(compute):.0f} ops/byte",
           "",
           "memory (exact)                          GiB",
           f"  weights                     {m.weight_bytes / GiB:>12.2f}",
           f"  KV cache                    {m.kv_cache_bytes / GiB:>12.2f}",
           f"  activations (estimate)      {m.activation_bytes / GiB:>12.2f}",
           f"  total                       {m.total_bytes / GiB:>12.2f}   of {m.device_memory_bytes / GiB:.1f} "
           f"({'fits' if m.fits else 'DOES NOT FIT'}); largest batch that fits: {m.max_batch_size}",
           f"memory (seed's simple fp16 formulas): weights {m.simple_weight_bytes / GiB:.1f} GiB, "
           f"KV cache {m.simple_kv_bytes / GiB:.1f} GiB",
           *_cluster_lines(r),
           "",
           phase_table(r.prefill, hw.ridge_point(compute)),
           "",
           phase_table(r.decode, hw.ridge_point(compute)),
           "",
           f"predicted: time to first token {r.prefill_time_s * 1e3:.2f} ms, {r.decode_time_s * 1e3:.3f} ms per "
           f"output token, {r.decode_tokens_per_s:.1f} tokens/s while decoding",
           "",
           "batch sweep (latency = batch x output_len / throughput)",
           f"  {'batch':>6} {'ms/token':>10} {'tokens/s':>10} {'latency s':>10}"]
    for p in r.sweep:
        out.append(f"  {p.batch_size:>6} {p.ms_per_token:>10.2f} {p.tokens_per_s:>10.1f} {p.latency_s:>10.2f}")
    return "\n".join(out)


def explain(r: AnalysisReport) -> str:
    """The seed's formulas with this model's and hardware's numbers filled in."""
    hw, s = r.hardware, r.model
    lines = ["How the numbers are derived:"]
    if hw.cuda_core_fp32_flops:
        lines.append(f"  peak FLOPS = ops per core per cycle x cores x clock = {hw.ops_per_core_per_cycle} x "
                     f"{hw.cuda_cores} x {hw.boost_clock_hz / 1e9:.3f} GHz = {hw.cuda_core_fp32_flops / 1e12:.1f} TFLOPS (fp32)")
    if hw.bus_bandwidth:
        lines.append(f"  peak bandwidth = memory clock x bus width x 2 / 8 = {hw.memory_clock_hz / 1e6:.0f} MHz x "
                     f"{hw.bus_width_bits} bit x 2 / 8 = {hw.bus_bandwidth / 1e9:.0f} GB/s")
    compute = "fp32" if r.dtype == "fp32" else "fp16"
    lines.append(f"  ops:byte (ridge point) = {hw.flops(compute) / 1e12:.1f} TFLOPS / {hw.bandwidth / 1e9:.0f} GB/s "
                 f"= {hw.ridge_point(compute):.0f}: operators below it are memory-bound, above it compute-bound")
    if hw.l2_bandwidth:
        lines.append(f"  against L2 ({hw.l2_bandwidth / 1e12:.1f} TB/s): {hw.flops(compute) / hw.l2_bandwidth:.0f} ops/byte")
    h, i, layers = s.hidden_size, s.intermediate_size, s.num_layers
    lines += [
        f"  weights (simple, fp16) = layers x (8 h^2 + 4 h h_mlp) = {layers} x (8 x {h}^2 + 4 x {h} x {i}) "
        f"= {r.memory.simple_weight_bytes / GiB:.1f} GiB",
        f"  KV cache (simple, fp16) = 4 x batch x layers x h x (s_in + s_out) = 4 x {r.batch_size} x {layers} x {h} x "
        f"({r.input_len} + {r.output_len}) = {r.memory.simple_kv_bytes / GiB:.1f} GiB",
        f"  KV cache (exact) = 2 x batch x layers x kv_heads x head_dim x (s_in + s_out) x bytes = 2 x {r.batch_size} x "
        f"{layers} x {s.num_kv_heads} x {s.head_dim} x {r.input_len + r.output_len} x bytes",
        "  operator time = max(FLOPs / peak FLOPS, bytes / peak bandwidth); a linear layer of n tokens has "
        "intensity ~ n ops/byte in fp16, so decode (n = batch) is memory-bound until batch reaches the ridge point",
        f"  decode is analysed at the average context s_in + s_out/2 = {r.decode.context_len}; tensor parallelism "
        "divides weights, FLOPs and KV heads by tp and ignores communication"]
    return "\n".join(lines)
