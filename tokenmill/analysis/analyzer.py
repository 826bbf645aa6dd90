"""``analyze()``: memory, prefill and decode rooflines, predicted latency and throughput, batch sweep."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.analysis.cluster import ClusterPlan, plan_cluster
from tokenmill.analysis.hardware import AnalysisError, Hardware, get_hardware
from tokenmill.analysis.memory import MemoryReport, dtype_bytes, memory_report
from tokenmill.analysis.model_shape import ModelShape, get_model_shape
from tokenmill.analysis.roofline import Phase, phase_ops


@dataclass(frozen=True)
class SweepPoint:
    batch_size: int
    ms_per_token: float
    """Decode latency per step (every sequence gets one token per step)."""
    tokens_per_s: float
    """Output throughput over the whole request: batch x s_out / (prefill + s_out decode steps)."""
    latency_s: float
    """End-to-end time of the batch: prefill + s_out decode steps (= batch x s_out / throughput)."""


@dataclass(frozen=True)
class AnalysisReport:
    model: ModelShape
    hardware: Hardware
    batch_size: int
    input_len: int
    output_len: int
    dtype: str
    kv_dtype: str
    tp: int
    memory: MemoryReport
    prefill: Phase
    decode: Phase
    sweep: list[SweepPoint]
    cluster: ClusterPlan | None = None
    """Set when the configuration does not fit ``tp`` devices: the smallest tp x pp that holds it (the
    phases are then per device at that tp; pipeline stages add transfers, not modelled)."""

    @property
    def prefill_time_s(self) -> float:
        """Predicted time to first token."""
        return self.prefill.time_s

    @property
    def decode_time_s(self) -> float:
        """Predicted time of one decode step (ms per output token, x 1000)."""
        return self.decode.time_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size / self.decode.time_s

    def to_dict(self) -> dict:
        def ops(phase: Phase):
            return [{"name": o.name, "kind": o.kind, "count": o.count, "flops": o.flops, "bytes": o.bytes,
                     "arithmetic_intensity": o.intensity, "bound": o.bound, "time_s": o.time_s} for o in phase.ops]
        compute = "fp32" if self.dtype == "fp32" else "fp16"
        m = self.memory
        return {
            "model": self.model.name, "hardware": self.hardware.name, "batch_size": self.batch_size,
            "input_len": self.input_len, "output_len": self.output_len, "dtype": self.dtype,
            "kv_dtype": self.kv_dtype, "tp": self.tp,
            "params": {"total": self.model.total_params(), "active_per_token": self.model.active_params_per_token()},
            "hardware_peaks": {"flops": self.hardware.flops(compute), "bandwidth": self.hardware.bandwidth,
                               "ridge_point": self.hardware.ridge_point(compute),
                               "memory_bytes": self.hardware.memory_bytes},
            "memory": {"weights": m.weight_bytes, "kv_cache": m.kv_cache_bytes, "activations": m.activation_bytes,
                       "total": m.total_bytes, "device": m.device_memory_bytes, "fits": m.fits,
                       "max_batch_size": m.max_batch_size, "simple_weights_fp16": m.simple_weight_bytes,
                       "simple_kv_cache_fp16": m.simple_kv_bytes},
            "prefill": {"time_s": self.prefill.time_s, "ops": ops(self.prefill)},
            "decode": {"time_s": self.decode.time_s, "context_len": self.decode.context_len, "ops": ops(self.decode)},
            "predicted": {"ttft_s": self.prefill_time_s, "ms_per_output_token": 1000 * self.decode_time_s,
                          "decode_tokens_per_s": self.decode_tokens_per_s},
            "sweep": [vars(p) for p in self.sweep],
            "cluster": None if self.cluster is None else {
                "tp": self.cluster.tp, "pp": self.cluster.pp, "num_devices": self.cluster.num_devices,
                "per_device_bytes": self.cluster.per_device_bytes,
                "device_memory_bytes": self.cluster.device_memory_bytes,
                "allreduce_bytes_per_token": self.cluster.allreduce_bytes_per_token,
                "pipeline_bytes_per_token": self.cluster.pipeline_bytes_per_token},
        }


def _decode_context(input_len: int, output_len: int) -> int:
    """One representative decode step: the average context over the generation."""
    return input_len + output_len // 2


def analyze(model: str | ModelShape, hardware: str | Hardware, batch_size: int = 1, input_len: int = 512,
            output_len: int = 128, dtype: str = "fp16", kv_dtype: str | None = None, tp: int = 1,
            check_fit: bool = True) -> AnalysisReport:
    """Analyses ``model`` on ``hardware``; AnalysisError for unknown presets, bad values or a batch that cannot fit."""
    shape = model if isinstance(model, ModelShape) else get_model_shape(model)
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware)
    kv_dtype = kv_dtype or ("fp32" if dtype == "fp32" else "fp16")
    dtype_bytes(dtype), dtype_bytes(kv_dtype)
    for name, value in (("batch_size", batch_size), ("input_len", input_len), ("output_len", output_len), ("tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise AnalysisError(f"{name} must be a positive integer, got {value!r}")
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        raise AnalysisError(f"tp {tp} does not divide the {shape.num_kv_heads} KV heads of {shape.name}")
    mem = memory_report(shape, batch_size, input_len, output_len, dtype, kv_dtype, hw.memory_bytes, tp, hw.quant_panels)
    cluster = None
    if check_fit and not mem.fits:  # analysed anyway, on the smallest layout of such devices that holds it
        cluster = plan_cluster(shape, mem, hw.memory_bytes, dtype)
        if cluster is None:
            over = mem.total_bytes - mem.device_memory_bytes
            raise AnalysisError(
                f"batch {batch_size} does not fit: it needs {mem.total_bytes / 2**30:.1f} GiB (weights "
                f"{mem.weight_bytes / 2**30:.1f}, KV cache {mem.kv_cache_bytes / 2**30:.1f}, activations "
                f"{mem.activation_bytes / 2**30:.1f}), {over / 2**30:.1f} GiB more than {hw.name} x{tp}, and no "
                f"layout of up to tp 8 x pp {shape.num_layers} {hw.name} devices holds it")
        tp = cluster.tp
    prefill = phase_ops(shape, hw, batch_size, input_len, input_len, dtype, kv_dtype, tp, "prefill")
    decode = phase_ops(shape, hw, batch_size, 1, _decode_context(input_len, output_len), dtype, kv_dtype, tp, "decode")
    return AnalysisReport(shape, hw, batch_size, input_len, output_len, dtype, kv_dtype, tp, mem, prefill, decode,
                          batch_sweep(shape, hw, input_len, output_len, dtype, kv_dtype, tp, mem.max_batch_size),
                          cluster)


def batch_sweep(shape: ModelShape, hw: Hardware, input_len: int, output_len: int, dtype: str, kv_dtype: str,
                tp: int, max_batch: int) -> list[SweepPoint]:
    """Powers of two up to the largest batch that fits: the latency/throughput trade-off."""
    points = []
    batch = 1
    while batch <= max(1, max_batch):
        prefill = phase_ops(shape, hw, batch, input_len, input_len, dtype, kv_dtype, tp, "prefill").time_s
        step = phase_ops(shape, hw, batch, 1, _decode_context(input_len, output_len), dtype, kv_dtype, tp,
                         "decode").time_s
        total = prefill + output_len * step
        points.append(SweepPoint(batch, 1000 * step, batch * output_len / total, total))
        batch *= 2
    return points
