"""The offload placement policy: which weights stay on the device, which stream from CPU memory or disk,
and the batch size that maximises throughput, from the same roofline as ``analyze``.

The model follows the engine (``offload/weights.py``) and FlexGen's cost model:
- Weights move in *units*: the embedding, each decoder layer, the LM head. The engine offloads decoder
  layers first (in order), then the head, then the embedding (a tied head and embedding together);
  two offloaded units are on the device at once (one computing, one arriving).
- Device memory holds the resident weights, the KV cache of ``batch`` sequences of input + output
  tokens, activations of one prefill chunk and the two units in flight. The bigger the batch, the
  more KV cache, the fewer weights stay resident.
- Every step moves every offloaded unit once, whatever the batch: a decode step takes
  ``max(compute, transfer)`` with prefetch (the next unit arrives while this one computes) and
  ``compute + transfer`` without; compute is the roofline's decode step at that batch, transfer the
  streamed bytes over the tier's bandwidth (CPU memory over the host link; disk at the disk's
  bandwidth, and no faster than the link on a GPU). On a GPU the first units to stream fill the CPU
  tier and the rest go to disk, as the engine places them with both ``cpu_offload_gb`` and
  ``offload_folder``. On a CPU device an offloaded embedding is read
  by rows from its file: it costs no transfer.
- Prefill computes ``batch x input_len`` tokens in steps of ``max_num_batched_tokens``, each moving
  the offloaded units once. Throughput = batch x output_len / (prefill + output_len decode steps).
Larger batches amortise the transfer over more sequences until the KV cache crowds the weights out.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.analysis.hardware import AnalysisError, Hardware
from tokenmill.analysis.memory import (QUANTIZED_DTYPES, activation_bytes_per_sequence, dtype_bytes,
                                       kv_bytes_per_token, quantized_matrix_bytes, weight_bytes_quantized)
from tokenmill.analysis.model_shape import ModelShape
from tokenmill.analysis.roofline import phase_ops


@dataclass(frozen=True)
class OffloadBudgets:
    device_memory: float
    """Bytes on the compute device for resident weights, the KV cache and activations."""
    cpu_memory: float
    """Bytes of CPU memory for offloaded weights on a GPU (pinned); 0: none. The device's own memory on CPU."""
    link_bandwidth: float
    """Host-to-device bytes/s (PCIe/NVLink-C2C); unused on a CPU device."""
    disk_bandwidth: float
    """Bytes/s that reading offloaded weights from disk reaches."""
    device_is_cpu: bool
    prefetch: bool = True
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        for name in ("device_memory", "disk_bandwidth") + (() if self.device_is_cpu else ("link_bandwidth",)):
            if getattr(self, name) <= 0:
                raise AnalysisError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.cpu_memory < 0:
            raise AnalysisError(f"cpu_memory must be 0 or more, got {self.cpu_memory!r}")


@dataclass(frozen=True)
class WeightUnit:
    name: str
    bytes: float
    reads_per_step: int = 1
    """A tied embedding and head is one tensor that two units use: streamed twice per step."""


def weight_units(shape: ModelShape, dtype: str, quant_panels: bool = False) -> list[WeightUnit]:
    """The engine's units in execution order with the bytes it holds for each (quantized as it quantizes;
    ``quant_panels``: in the CPU panel layout, ``Hardware.quant_panels``)."""
    act = "fp32" if dtype == "fp32" else "fp16"
    act_bytes = dtype_bytes(act)
    embedding = (shape.vocab_size + shape.learned_positions) * shape.hidden_size * (
        act_bytes if dtype in QUANTIZED_DTYPES else dtype_bytes(dtype))
    if dtype in QUANTIZED_DTYPES:
        head_group = 64 if shape.hidden_size % 64 == 0 else -1
        head_bytes = quantized_matrix_bytes(shape.vocab_size, shape.hidden_size, 8, head_group, act_bytes, quant_panels)
        head = 0.0 if shape.tie_word_embeddings else head_bytes
        layers = (weight_bytes_quantized(shape, dtype, act, panels=quant_panels) - embedding - head
                  - 4 * shape.norm_params())
        if shape.tie_word_embeddings:
            layers -= head_bytes
    else:
        head = 0.0 if shape.tie_word_embeddings else shape.vocab_size * shape.hidden_size * dtype_bytes(dtype)
        layers = shape.all_layer_params() * dtype_bytes(dtype)
    units = [WeightUnit("embedding + lm_head" if shape.tie_word_embeddings else "embedding", embedding,
                        2 if shape.tie_word_embeddings else 1)]
    units += [WeightUnit(f"layer {i}", layers / shape.num_layers) for i in range(shape.num_layers)]
    return units + ([] if shape.tie_word_embeddings else [WeightUnit("lm_head", head)])


@dataclass(frozen=True)
class PlacementPoint:
    """One batch size's best placement and its predicted speed."""

    batch_size: int
    resident_bytes: float
    offloaded_bytes: float
    cpu_bytes: float
    """Of the offloaded bytes, those in pinned CPU memory (the rest are on disk)."""
    tier: str
    """Where the offloaded units live: ``none``, ``cpu`` (pinned CPU memory), ``disk`` or ``cpu+disk``."""
    num_offloaded_units: int
    kv_cache_bytes: float
    activation_bytes: float
    in_flight_bytes: float
    decode_compute_s: float
    transfer_s: float
    """Moving the streamed units once (each step does)."""
    decode_step_s: float
    prefill_s: float
    tokens_per_s: float

    @property
    def bound(self) -> str:
        """``transfer`` when moving the offloaded units takes longer than the device's own step (its roofline
        time: reading resident weights and KV cache, computing), else ``device``."""
        return "transfer" if self.transfer_s > self.decode_compute_s else "device"


@dataclass(frozen=True)
class OffloadPlan:
    model: ModelShape
    hardware: Hardware
    budgets: OffloadBudgets
    dtype: str
    kv_dtype: str
    input_len: int
    output_len: int
    units: list[WeightUnit]
    sweep: list[PlacementPoint]
    best: PlacementPoint

    def engine_options(self) -> dict:
        """The engine settings that realise the chosen placement (``LLM(...)`` keyword arguments)."""
        best = self.best
        block = 16  # the engine's default block size: each sequence's last block is rounded up
        tokens = -(-(self.input_len + self.output_len) // block) * block
        kv = best.batch_size * tokens * kv_bytes_per_token(self.model, self.kv_dtype)
        options = {"max_num_seqs": best.batch_size, "kv_cache_memory": int(kv)}
        if best.tier == "cpu":
            options["cpu_offload_gb"] = round(best.offloaded_bytes / 2**30, 3)
        elif best.tier == "disk":
            options["max_weight_memory"] = int(best.resident_bytes) + 1
        elif best.tier == "cpu+disk":  # the engine fills pinned memory in streaming order, as planned
            options["max_weight_memory"] = int(best.resident_bytes) + 1
            options["cpu_offload_gb"] = best.cpu_bytes / 2**30  # exact: bytes / 2^30 is a binary fraction
        return options

    def to_dict(self) -> dict:
        return {"model": self.model.name, "hardware": self.hardware.name, "dtype": self.dtype,
                "kv_dtype": self.kv_dtype, "input_len": self.input_len, "output_len": self.output_len,
                "budgets": vars(self.budgets), "weight_bytes": sum(u.bytes for u in self.units),
                "sweep": [{**vars(p), "bound": p.bound} for p in self.sweep],
                "best": {**vars(self.best), "bound": self.best.bound}, "engine_options": self.engine_options()}


def _choose_offloaded(units: list[WeightUnit], room: float) -> list[int] | None:
    """Indices the engine offloads (layers in order, the head, the embedding) so that resident weights and
    the two largest offloaded units in flight fit ``room``; None if nothing does."""
    order = ([i for i, u in enumerate(units) if u.name.startswith("layer")]
             + [i for i, u in enumerate(units) if u.name == "lm_head"]
             + [i for i, u in enumerate(units) if u.name.startswith("embedding")])
    total = sum(u.bytes for u in units)
    for count in range(len(order) + 1):
        chosen = order[:count]
        sizes = sorted((units[i].bytes for i in chosen), reverse=True)
        if total - sum(sizes) + sum(sizes[:2]) <= room:
            return chosen
    return None


def _point(shape: ModelShape, hw: Hardware, budgets: OffloadBudgets, units: list[WeightUnit], batch: int,
           input_len: int, output_len: int, dtype: str, kv_dtype: str) -> PlacementPoint | None:
    act = "fp32" if dtype == "fp32" else "fp16"
    kv = batch * kv_bytes_per_token(shape, kv_dtype) * (input_len + output_len)
    chunk = max(1, min(batch, budgets.max_num_batched_tokens // input_len))  # sequences prefilled in one step
    activations = chunk * activation_bytes_per_sequence(shape, min(input_len, budgets.max_num_batched_tokens), act)
    chosen = _choose_offloaded(units, budgets.device_memory - kv - activations)
    if chosen is None:
        return None
    offloaded = sum(units[i].bytes for i in chosen)
    # On a GPU the units stream in execution order; the first go to pinned memory while they fit the CPU
    # tier, the rest to disk, read through the host (``SplitTier``). On a CPU device: all on disk.
    pinned: list[int] = []
    if not budgets.device_is_cpu:
        for i in sorted(chosen):
            if sum(units[j].bytes for j in pinned) + units[i].bytes > budgets.cpu_memory:
                break
            pinned.append(i)
    on_disk = [i for i in chosen if i not in pinned]
    tier = "none" if not chosen else "+".join(name for name, part in (("cpu", pinned), ("disk", on_disk)) if part)
    disk_bandwidth = budgets.disk_bandwidth if budgets.device_is_cpu else min(budgets.disk_bandwidth,
                                                                             budgets.link_bandwidth)

    def streamed(indices: list[int]) -> float:  # on a CPU device an embedding is read by rows from its file
        return sum(units[i].bytes * units[i].reads_per_step for i in indices
                   if not (budgets.device_is_cpu and units[i].name == "embedding"))

    transfer = streamed(pinned) / budgets.link_bandwidth + streamed(on_disk) / disk_bandwidth
    cpu_bytes = sum(units[i].bytes for i in pinned)
    in_flight = sum(sorted((units[i].bytes for i in chosen), reverse=True)[:2])
    compute = phase_ops(shape, hw, batch, 1, input_len + output_len // 2, dtype, kv_dtype, 1, "decode").time_s
    prefill_compute = phase_ops(shape, hw, batch, input_len, input_len, dtype, kv_dtype, 1, "prefill").time_s
    prefill_steps = -(-batch * input_len // budgets.max_num_batched_tokens)
    if budgets.prefetch:
        step, prefill = max(compute, transfer), max(prefill_compute, prefill_steps * transfer)
    else:
        step, prefill = compute + transfer, prefill_compute + prefill_steps * transfer
    tokens_per_s = batch * output_len / (prefill + output_len * step)
    return PlacementPoint(batch, sum(u.bytes for u in units) - offloaded, offloaded, cpu_bytes, tier, len(chosen),
                          kv, activations, in_flight, compute, transfer, step, prefill, tokens_per_s)


def plan_offload(shape: ModelShape, hw: Hardware, budgets: OffloadBudgets, input_len: int = 512,
                 output_len: int = 128, dtype: str = "fp16", kv_dtype: str | None = None,
                 max_batch_size: int = 4096) -> OffloadPlan:
    """Every power-of-two batch that fits the budgets, with its placement and predicted tokens/s, and the
    fastest of them; AnalysisError if not even batch 1 fits."""
    kv_dtype = kv_dtype or ("fp32" if dtype == "fp32" else "fp16")
    dtype_bytes(dtype), dtype_bytes(kv_dtype)
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if not isinstance(value, int) or value < 1:
            raise AnalysisError(f"{name} must be a positive integer, got {value!r}")
    units = weight_units(shape, dtype, hw.quant_panels)
    sweep = []
    batch = 1
    while batch <= max_batch_size:
        point = _point(shape, hw, budgets, units, batch, input_len, output_len, dtype, kv_dtype)
        if point is None:
            break
        sweep.append(point)
        batch *= 2
    if not sweep:
        need = min(u.bytes for u in units) + kv_bytes_per_token(shape, kv_dtype) * (input_len + output_len)
        raise AnalysisError(
            f"{shape.name} cannot run in {budgets.device_memory / 2**30:.2f} GiB of device memory even with every "
            f"unit offloaded: one sequence's KV cache, its activations and two units in flight need more "
            f"(at least {need / 2**30:.2f} GiB before activations)")
    best = max(sweep, key=lambda p: (p.tokens_per_s, -p.batch_size))
    return OffloadPlan(shape, hw, budgets, dtype, kv_dtype, input_len, output_len, units, sweep, best)
