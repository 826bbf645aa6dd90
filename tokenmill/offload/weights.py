"""Weight offloading: parts of the model whose weights live off the compute device and visit it only for
their own forward pass (FlexGen / ZeRO-Inference style, one unit at a time).

A *unit* is a decoder layer, the LM head or the token embedding. Two tiers hold offloaded units:
- ``HostTier`` (CUDA, ``cpu_offload_gb``): pinned host memory, copied to the GPU on a side stream;
- ``DiskTier`` (any device, ``offload_folder`` with ``max_weight_memory``): one safetensors file per
  unit, written once after loading, read back by a background thread.

``WeightStreamer`` hooks each offloaded unit: before its forward the unit's tensors are put in place
(waiting for them if they are still arriving) and, with ``prefetch``, the next offloaded unit starts
arriving, so that its copy or read overlaps this unit's compute; after its forward they are dropped.
At most two offloaded units are on the device at once. The tensors streamed are a unit's parameters,
its persistent buffers (quantized codes and scales) and oneDNN-prepacked weights (stored plain,
packed again on arrival: the same packed bytes, so the same results); model code does not change.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.logger import get_logger

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


class HostTier:
    """Offloaded units in pinned host memory; copies to the CUDA device run on a side stream."""

    def __init__(self, device: torch.device):
        self.device, self.name = device, "pinned CPU memory"
        self._stream = torch.cuda.Stream(device)
        self._units: dict[int, dict[str, torch.Tensor]] = {}

    def store(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._units[index] = {name: t.detach().cpu().pin_memory() for name, t in tensors.items()}

    def close(self) -> None:
        """Frees the pinned memory."""
        self._units.clear()

    def fetch(self, index: int):
        """Starts copying unit ``index`` to the device; ``ready`` makes the compute stream wait for it."""
        with torch.cuda.stream(self._stream):
            copies = {name: t.to(self.device, non_blocking=True) for name, t in self._units[index].items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return copies, event

    def ready(self, fetched) -> dict[str, torch.Tensor]:
        copies, event = fetched
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for tensor in copies.values():
            tensor.record_stream(compute)  # allocated on the side stream: not reused before compute is done
        return copies


class DiskTier:
    """Offloaded units as safetensors files in ``folder``, read back by a background thread."""

    def __init__(self, folder: str | Path, device: torch.device):
        """Writes into a fresh subfolder of ``folder`` (one per engine and rank), removed with the tier."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder, self.device = Path(tempfile.mkdtemp(prefix="tokenmill-weights-", dir=folder)), device
        self.name = f"disk ({self.folder})"
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-offload-read")
        self.close = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
        """Removes the files (at the latest when the process exits)."""

    def _path(self, index: int) -> Path:
        return self.folder / f"unit-{index:04d}.safetensors"

    def store(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        packed = [name for name, t in tensors.items() if t.layout == torch._mkldnn]
        plain = {name: (t.to_dense() if name in packed else t).detach().cpu().contiguous()
                 for name, t in tensors.items()}
        save_file(plain, str(self._path(index)), metadata={"prepacked": ",".join(packed)})

    def fetch(self, index: int) -> Future:
        return self._reader.submit(self._read, index)

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        from tokenmill.layers.quantization.methods import prepack_linear_weight

        with safe_open(str(self._path(index)), framework="pt") as f:
            packed = set(filter(None, f.metadata()["prepacked"].split(",")))
            tensors = {name: f.get_tensor(name).to(self.device) for name in f.keys()}
        return {name: prepack_linear_weight(t) if name in packed else t for name, t in tensors.items()}

    def ready(self, fetched: Future) -> dict[str, torch.Tensor]:
        return fetched.result()

    def map_rows(self, name: str, table: torch.Tensor) -> torch.Tensor:
        """``table`` (V, H) written to a raw file and mapped back: a lookup reads only its rows' pages
        (file-backed memory the system can drop again), never the whole table."""
        path = self.folder / f"{name}.bin"
        plain = table.detach().cpu().contiguous()
        plain.view(torch.uint8).numpy().tofile(path)
        return torch.from_file(str(path), shared=True, size=plain.numel(), dtype=plain.dtype).view(plain.shape)


@dataclass
class OffloadStats:
    """What the streamer holds and moves."""

    num_units: int = 0
    offloaded_bytes: int = 0
    """Bytes of the streamed units: what a step brings back."""
    mapped_bytes: int = 0
    """An embedding table left in its file on disk, read by rows (not streamed)."""
    peak_streamed_bytes: int = 0
    """The most bytes of offloaded units on the device at once (arriving ones counted in full)."""
    fetches: int = 0


class WeightStreamer:
    """Streams ``units`` (name -> module, in execution order) through ``tier``."""

    def __init__(self, units: list[tuple[str, nn.Module]], tier, prefetch: bool = True):
        self.tier, self.prefetch = tier, prefetch
        self.names = [name for name, _ in units]
        self._modules = [module for _, module in units]
        self.stats = OffloadStats(num_units=len(units))
        self.unit_bytes: list[int] = []  # each streamed unit's bytes, in ``names`` order
        self._empty = []
        self._pending: dict[int, object] = {}  # unit -> its fetch in progress
        self._resident: set[int] = set()
        everything = [unit_tensors(module) for module in self._modules]
        for index, tensors in enumerate(everything):  # all stored before any unit empties a tensor it shares
            self.unit_bytes.append(tensor_bytes(tensors))
            tier.store(index, tensors)
        for index, (module, tensors) in enumerate(zip(self._modules, everything)):
            # Away from the device: empty tensors in place of the weights (a prepacked weight becomes None).
            empty = {name: torch.empty(0, dtype=t.dtype, device=tier.device) if t.layout == torch.strided else None
                     for name, t in tensors.items()}
            self._empty.append(empty)
            for name, placeholder in empty.items():
                _put(module, name, placeholder)  # the unit's own copy is freed
            module.register_forward_pre_hook(lambda _m, _args, i=index: self._arrive(i))
            module.register_forward_hook(lambda _m, _args, _out, i=index: self._leave(i))
        self.stats.offloaded_bytes = sum(self.unit_bytes)

    def _start(self, index: int) -> None:
        if index not in self._pending and index not in self._resident:
            self._pending[index] = self.tier.fetch(index)
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


def offload_weights(model: nn.Module, tier, *, offload_bytes: int | None = None, resident_bytes: int | None = None,
                    prefetch: bool = True) -> WeightStreamer:
    """Moves units of ``model`` to ``tier`` and streams them back for their forward passes: decoder layers
    first (in order), then the LM head, then the embedding, until ``offload_bytes`` are offloaded
    (``cpu_offload_gb``) or what stays is at most ``resident_bytes`` (``max_weight_memory``). A tied LM
    head and embedding go together (they are one tensor)."""
    units = model_units(model)
    sizes = [tensor_bytes(unit_tensors(module)) for _, module in units]
    total = tensor_bytes(unit_tensors(model))
    storages = [{t.data_ptr() for t in unit_tensors(module).values() if t.layout == torch.strided and t.numel()}
                for _, module in units]
    priority = ([i for i, (name, _) in enumerate(units) if name.startswith("layer")]
                + [i for i, (name, _) in enumerate(units) if name == "lm_head"]
                + [i for i, (name, _) in enumerate(units) if name == "embedding"])
    chosen: set[int] = set()
    for index in priority:
        offloaded = tensor_bytes([t for i in chosen for t in unit_tensors(units[i][1]).values()])
        if (offload_bytes is not None and offloaded >= offload_bytes) or (
                resident_bytes is not None and total - offloaded <= resident_bytes):
            break
        chosen |= {index} | {i for i in range(len(units)) if storages[i] & storages[index]}  # tied: together
    if resident_bytes is not None:  # the embedding or head may have overshot: take back what still fits
        for index in sorted(chosen, key=priority.index):
            partners = {i for i in chosen if storages[i] & storages[index]}
            back = tensor_bytes([t for i in chosen - partners for t in unit_tensors(units[i][1]).values()])
            if partners == {index} and total - back <= resident_bytes:
                chosen.discard(index)
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
    _return_freed_memory()
    resident = tensor_bytes(unit_tensors(model)) - mapped_bytes
    logger.info("weight offload: %d of %d units (%.1f MiB) in %s, streamed back %s%s; %.1f MiB stay resident%s",
                len(streamed), len(units), streamer.stats.offloaded_bytes / 2**20, tier.name,
                "one unit ahead" if prefetch else "when needed (no prefetch)",
                f", the embedding ({mapped_bytes / 2**20:.1f} MiB) read by rows from its file" if mapped else "",
                resident / 2**20,
                f" (max_weight_memory {resident_bytes / 2**20:.1f} MiB)" if resident_bytes is not None else "")
    if resident_bytes is not None and resident > resident_bytes:
        logger.warning("resident weights (%.1f MiB: norms, position tables and what cannot be streamed) exceed "
                       "max_weight_memory %.1f MiB even with every unit offloaded", resident / 2**20,
                       resident_bytes / 2**20)
    return streamer


def apply_weight_offload(model: nn.Module, config, device: torch.device) -> WeightStreamer | None:
    """The weight offload ``config`` (an EngineConfig) asks for, applied to ``model`` (this rank's part,
    loaded): ``cpu_offload_gb`` on CUDA, or ``offload_folder`` with ``max_weight_memory``; None for neither.
    The streamer is kept on the model as ``weight_streamer`` (the C++ decode step then stays off)."""
    if config.cpu_offload_gb:
        if device.type != "cuda":
            raise ValueError(f"cpu_offload_gb streams weights from CPU memory to a GPU; the device is {device}. "
                             "On CPU, give offload_folder and max_weight_memory (weights on disk)")
        streamer = offload_weights(model, HostTier(device), offload_bytes=int(config.cpu_offload_gb * 2**30),
                                   prefetch=config.offload_prefetch)
    elif config.offload_folder is not None:
        streamer = offload_weights(model, DiskTier(config.offload_folder, device),
                                   resident_bytes=config.max_weight_memory, prefetch=config.offload_prefetch)
    else:
        return None
    model.weight_streamer = streamer
    return streamer
