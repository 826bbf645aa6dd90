"""Weight offloading: parts of the model whose weights live off the compute device and visit it only for
their own forward pass (FlexGen / ZeRO-Inference style, one unit at a time).

A *unit* is a decoder layer, the LM head or the token embedding. Offloaded units live in a tier
(``weight_tiers.py``): pinned host memory (``cpu_offload_gb``, CUDA), files (``offload_folder`` with
``max_weight_memory``, any device), or both at once on CUDA.

``WeightStreamer`` hooks each offloaded unit: before its forward the unit's tensors are put in place
(waiting for them if they are still arriving) and, with ``prefetch``, the next offloaded unit starts
arriving, so that its copy or read overlaps this unit's compute; after its forward they are dropped.
At most two offloaded units are on the device at once. The tensors streamed are a unit's parameters,
its persistent buffers (quantized codes and scales) and oneDNN-prepacked weights (stored plain,
packed again on arrival: the same packed bytes, so the same results); model code does not change.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.logger import get_logger
from tokenmill.offload.weight_tiers import DiskTier, HostTier

logger = get_logger(__name__)

_PACKED = "packed_weight"  # Linear's oneDNN-prepacked weight: a plain attribute, streamed with the rest


def unit_tensors(unit: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``unit`` that weigh something, by dotted name: parameters, persistent buffers,
    prepacked weights (not shared non-persistent buffers such as rotary tables, nor KV caches)."""
    found = {}
    for prefix, module in unit.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                found[dot + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                found[dot + name] = buffer
        packed = getattr(module, _PACKED, None)
        if isinstance(packed, torch.Tensor):
            found[dot + _PACKED] = packed
    return found


def tensor_bytes(tensors) -> int:
    """Bytes of ``tensors`` (a dict or an iterable), each storage counted once."""
    seen, total = set(), 0
    for t in tensors.values() if isinstance(tensors, dict) else tensors:
        key = (t.device, t.data_ptr()) if t.layout == torch.strided and t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _put(unit: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = unit.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf].data = tensor  # the same Parameter object (a tied head shares it)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        setattr(module, leaf, tensor)


@dataclass
class OffloadStats:
    """What the streamer holds and moves."""

    num_units: int = 0
    offloaded_bytes: int = 0
    """Bytes of the streamed units: what a step brings back."""
    mapped_bytes: int = 0
    """An embedding table left in its file on disk, read by rows (not streamed)."""
    mapped_from: str | None = None
    """That file: the checkpoint's own, or a raw copy in the offload folder."""
    peak_streamed_bytes: int = 0
    """The most bytes of offloaded units on the device at once (arriving ones counted in full)."""
    fetches: int = 0


@dataclass
class StoredUnit:
    """An offloaded unit as the streamer needs it: its bytes, and what stands in for each of its tensors
    while it is away (an empty tensor; None for a prepacked oneDNN weight)."""

    nbytes: int
    placeholders: dict[str, torch.Tensor | None]

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], device: torch.device) -> "StoredUnit":
        return cls(tensor_bytes(tensors), {name: torch.empty(0, dtype=t.dtype, device=device)
                                           if t.layout == torch.strided else None for name, t in tensors.items()})


class WeightStreamer:
    """Streams ``units`` (name -> module, in execution order) through ``tier``."""

    def __init__(self, units: list[tuple[str, nn.Module]], tier, prefetch: bool = True,
                 stored: dict[str, StoredUnit] | None = None):
        """``stored``: the units are in ``tier`` already and hold their placeholders (``UnitAssembler``);
        otherwise each unit's tensors are stored now and replaced by placeholders."""
        self.tier, self.prefetch = tier, prefetch
        self.names = [name for name, _ in units]
        self._modules = [module for _, module in units]
        self.stats = OffloadStats(num_units=len(units))
        self._pending: dict[int, object] = {}  # unit -> its fetch in progress
        self._resident: set[int] = set()
        if stored is None:
            stored = {}
            everything = [unit_tensors(module) for module in self._modules]
            for name, tensors in zip(self.names, everything):  # all stored before any unit empties a shared tensor
                tier.store(name, tensors)
                stored[name] = StoredUnit.of(tensors, tier.device)
            for module, name in zip(self._modules, self.names):
                for tensor_name, placeholder in stored[name].placeholders.items():
                    _put(module, tensor_name, placeholder)  # the unit's own copy is freed
        self.unit_bytes = [stored[name].nbytes for name in self.names]  # each streamed unit's, in ``names`` order
        self._empty = [stored[name].placeholders for name in self.names]
        for index, module in enumerate(self._modules):
            module.register_forward_pre_hook(lambda _m, _args, i=index: self._arrive(i))
            module.register_forward_hook(lambda _m, _args, _out, i=index: self._leave(i))
        self.stats.offloaded_bytes = sum(self.unit_bytes)

    def _start(self, index: int) -> None:
        if index not in self._pending and index not in self._resident:
            self._pending[index] = self.tier.fetch(self.names[index])
            self.stats.fetches += 1

    def _arrive(self, index: int) -> None:
        self._start(index)
        if index in self._pending:
            for name, tensor in self.tier.ready(self._pending.pop(index)).items():
                _put(self._modules[index], name, tensor)
            self._resident.add(index)
        following = (index + 1) % len(self._modules)
        if self.prefetch and following != index:
            self._start(following)  # overlaps this unit's compute
        streamed = sum(self.unit_bytes[i] for i in self._resident | set(self._pending))
        self.stats.peak_streamed_bytes = max(self.stats.peak_streamed_bytes, streamed)

    def close(self) -> None:
        """Releases the tier (its files or pinned memory); the streamed units cannot run after this."""
        self.tier.close()

    def _leave(self, index: int) -> None:
        for name, empty in self._empty[index].items():
            _put(self._modules[index], name, empty)
        self._resident.discard(index)


def _return_freed_memory() -> None:
    """Gives the offloaded units' freed memory back to the system now (glibc keeps freed blocks below
    the tensors that stay resident in its heap, so the process's memory would not shrink otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def model_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units of ``model`` (this pipeline stage's) in the order a step runs them: the embedding, the
    decoder layers, the LM head."""
    inner = model.model if hasattr(model, "model") else model.transformer
    layers = inner.layers if hasattr(inner, "layers") else inner.h
    embedding = getattr(inner, "embed_tokens", None) or getattr(inner, "wte", None)
    units = [("embedding", embedding)] if embedding is not None else []
    units += [(f"layer {i}", layers[i]) for i in inner.owned]
    return units + ([("lm_head", model.lm_head)] if model.lm_head is not None else [])


def choose_offloaded(names: list[str], keyed: list[dict[object, int]], total: int, offload_bytes: int | None = None,
                     resident_bytes: int | None = None) -> set[int]:
    """The units to offload: decoder layers first (in order), then the LM head, then the embedding, until
    ``offload_bytes`` are offloaded or what stays (of ``total`` bytes) is at most ``resident_bytes``; then,
    under ``resident_bytes``, units that still fit are taken back. ``keyed[i]``: unit i's tensors, a key
    per storage (units that share a tensor share its key, and go together) -> bytes."""
    def offloaded(units) -> int:
        return sum({key: size for i in units for key, size in keyed[i].items()}.values())

    sharing = [{j for j in range(len(names)) if keyed[j].keys() & keyed[i].keys()} | {i} for i in range(len(names))]
    priority = ([i for i, name in enumerate(names) if name.startswith("layer")]
                + [i for i, name in enumerate(names) if name == "lm_head"]
                + [i for i, name in enumerate(names) if name.startswith("embedding")])
    chosen: set[int] = set()
    for index in priority:
        done = offloaded(chosen)
        if (offload_bytes is not None and done >= offload_bytes) or (
                resident_bytes is not None and total - done <= resident_bytes):
            break
        chosen |= sharing[index]  # tied: together
    if resident_bytes is not None:  # the embedding or head may have overshot: take back what still fits
        for index in sorted(chosen, key=priority.index):
            partners = sharing[index] & chosen
            if partners == {index} and total - offloaded(chosen - partners) <= resident_bytes:
                chosen.discard(index)
    return chosen


def offload_weights(model: nn.Module, tier, *, offload_bytes: int | None = None, resident_bytes: int | None = None,
                    prefetch: bool = True) -> WeightStreamer:
    """Moves units of ``model`` to ``tier`` and streams them back for their forward passes: decoder layers
    first (in order), then the LM head, then the embedding, until ``offload_bytes`` are offloaded
    (``cpu_offload_gb``) or what stays is at most ``resident_bytes`` (``max_weight_memory``). A tied LM
    head and embedding go together (they are one tensor)."""
    units = model_units(model)
    total = tensor_bytes(unit_tensors(model))
    keyed = [{t.data_ptr() if t.layout == torch.strided and t.numel() else id(t): tensor_bytes([t])
              for t in unit_tensors(module).values()} for _, module in units]
    storages = [set(tensors) for tensors in keyed]
    chosen = choose_offloaded([name for name, _ in units], keyed, total, offload_bytes, resident_bytes)
    mapped = [i for i in chosen if units[i][0] == "embedding" and isinstance(tier, DiskTier)
              and tier.device.type == "cpu" and list(unit_tensors(units[i][1])) == ["weight"]
              and not any(storages[j] & storages[i] for j in chosen - {i})]  # not tied to a streamed head
    mapped_bytes = 0
    for index in mapped:  # a step reads a few rows of an embedding table: leave it in its file
        module = units[index][1]
        mapped_bytes += tensor_bytes(unit_tensors(module))
        _put(module, "weight", tier.map_rows("embedding", module.weight))
    streamed = [units[i] for i in sorted(chosen - set(mapped))]
    streamer = WeightStreamer(streamed, tier, prefetch)
    streamer.stats.mapped_bytes = mapped_bytes
    streamer.stats.mapped_from = "its raw copy in the offload folder" if mapped else None
    _return_freed_memory()
    report_offload(model, streamer, len(units), resident_bytes)
    return streamer


def report_offload(model: nn.Module, streamer: WeightStreamer, num_units: int, resident_bytes: int | None) -> None:
    """Logs where the weights went; warns when what cannot be streamed exceeds ``resident_bytes``."""
    stats = streamer.stats
    resident = tensor_bytes(unit_tensors(model)) - stats.mapped_bytes
    logger.info("weight offload: %d of %d units (%.1f MiB) in %s, streamed back %s%s; %.1f MiB stay resident%s",
                stats.num_units, num_units, stats.offloaded_bytes / 2**20, streamer.tier.name,
                "one unit ahead" if streamer.prefetch else "when needed (no prefetch)",
                f", the embedding ({stats.mapped_bytes / 2**20:.1f} MiB) read by rows from {stats.mapped_from}"
                if stats.mapped_from else "", resident / 2**20,
                f" (max_weight_memory {resident_bytes / 2**20:.1f} MiB)" if resident_bytes is not None else "")
    if resident_bytes is not None and resident > resident_bytes:
        logger.warning("resident weights (%.1f MiB: norms, position tables and what cannot be streamed) exceed "
                       "max_weight_memory %.1f MiB even with every unit offloaded", resident / 2**20,
                       resident_bytes / 2**20)


def check_cpu_offload_device(config, device: torch.device) -> None:
    """ValueError if ``cpu_offload_gb`` is asked for where there is no GPU to stream to."""
    if config.cpu_offload_gb and device.type != "cuda":
        raise ValueError(f"cpu_offload_gb streams weights from CPU memory to a GPU; the device is {device}. "
                         "On CPU, give offload_folder and max_weight_memory (weights on disk)")


def apply_weight_offload(model: nn.Module, config, device: torch.device) -> WeightStreamer | None:
    """The weight offload ``config`` (an EngineConfig) asks for, applied to ``model`` (this rank's part,
    loaded): ``cpu_offload_gb`` on CUDA, or ``offload_folder`` with ``max_weight_memory``; None for neither.
    The streamer is kept on the model as ``weight_streamer`` (the C++ decode step then stays off)."""
    check_cpu_offload_device(config, device)
    if config.cpu_offload_gb:
        streamer = offload_weights(model, HostTier(device), offload_bytes=int(config.cpu_offload_gb * 2**30),
                                   prefetch=config.offload_prefetch)
    elif config.offload_folder is not None:
        streamer = offload_weights(model, DiskTier(config.offload_folder, device),
                                   resident_bytes=config.max_weight_memory, prefetch=config.offload_prefetch)
    else:
        return None
    model.weight_streamer = streamer
    return streamer
