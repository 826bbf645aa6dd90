"""Loading a model whose offloaded weights never all sit in memory (``offload_folder`` with
``max_weight_memory``, any device) nor on the GPU (``cpu_offload_gb``).

The model is built on the CPU with uninitialised tensors (untouched memory costs nothing), then
filled from its source one parameter at a time. ``UnitAssembler`` watches the parameters arrive;
when a *unit* (the embedding, a decoder layer, the LM head) has all of its weights it moves to the
device, is processed into its runtime layout (panels, quantized codes), stored in its tier (a file,
or pinned CPU memory) and freed. An untied embedding on CPU is instead mapped by rows, straight from
the checkpoint's own safetensors file when the table there is stored as the model holds it (same
dtype, one tensor, no tensor-parallel split), else from a raw copy in the offload folder. When every
weight is in, the units that fit the budget are taken back, in the order ``offload_weights`` keeps
them (the embedding and head before decoder layers), and the rest stream as usual. The peak is the
budget plus the units being assembled: one at a time for sources grouped by unit (safetensors, GGUF,
random shapes), more for llama2.c files, which store each matrix type for all layers together.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tokenmill.logger import get_logger
from tokenmill.models.loader import (fill_weights, map_checkpoint_tensor, open_model, process_module,
                                     process_weights_after_loading, safetensors_tensor_files)
from tokenmill.offload.weight_tiers import DiskTier, HostTier, SplitTier
from tokenmill.offload.weights import (StoredUnit, WeightStreamer, _put, _return_freed_memory,
                                       check_cpu_offload_device, choose_offloaded, model_units, report_offload,
                                       tensor_bytes, unit_tensors)

logger = get_logger(__name__)


def _keyed_bytes(module: nn.Module) -> dict[object, int]:
    """A unit's tensors by identity (a Parameter shared by two units has one key), with their bytes."""
    return {id(t) if isinstance(t, nn.Parameter) else (id(module), name): tensor_bytes([t])
            for name, t in unit_tensors(module).items()}


class UnitAssembler:
    """Processes, stores and frees each unit of ``model`` as soon as its last weight arrives."""

    def __init__(self, model: nn.Module, tier: DiskTier | HostTier | SplitTier, prepack: bool,
                 checkpoint_files: dict[str, Path]):
        """``model`` is on the CPU; a unit moves to the tier's device (a GPU) when complete, before processing."""
        self.model, self.tier, self.prepack = model, tier, prepack
        self.checkpoint_files = checkpoint_files
        self.units = model_units(model)
        self.needed: list[set[tuple[int, object]]] = []
        self.owners: dict[tuple[int, object], list[int]] = defaultdict(list)
        self.params = [list(module.parameters()) for _, module in self.units]
        """Each unit's parameters as built: the loaders hold them (``named_parameters``) after processing
        has replaced some by packed copies, so storing a unit empties them itself."""
        for index, (_, module) in enumerate(self.units):
            needed = set()
            for param in self.params[index]:
                if getattr(param, "optional", False):
                    continue  # may never arrive (a GPTQ g_idx): the unit is complete without it
                for shard in getattr(param, "shard_ids", (None,)):
                    needed.add((id(param), shard))
                    self.owners[(id(param), shard)].append(index)
            self.needed.append(needed)
        self.processed: set[int] = set()  # ids of modules whose weights are in their runtime layout
        self.keyed: dict[int, dict[object, int]] = {}  # each stored unit's tensors (for the choice)
        self.mapped: dict[int, str] = {}  # unit -> where its table is mapped from ("checkpoint" or "raw copy")
        self.sources: dict[int, str] = {}  # id(param) -> the checkpoint tensor that filled it whole
        self.stored: dict[str, StoredUnit] = {}  # units in the tier, by name

    def loaded(self, param: nn.Parameter, shard_id, source: str | None, tensor: torch.Tensor | None) -> None:
        """Called after each weight is copied into ``param`` (``source``: its checkpoint name, if any)."""
        if (source is not None and shard_id is None and tensor is not None and tensor.dtype == param.dtype
                and tensor.shape == param.shape):
            self.sources[id(param)] = source
        complete = []
        for index in self.owners.get((id(param), shard_id), ()):
            self.needed[index].discard((id(param), shard_id))
            if not self.needed[index]:
                complete.append(index)
        if complete:
            self._complete(complete)

    def _complete(self, indices: list[int]) -> None:
        if not indices:
            return
        # Every unit first: a tied head and embedding complete together and are both stored before
        # either frees the table they share.
        for index in indices:
            self.units[index][1].to(self.tier.device)  # a no-op on CPU
            for module in self.units[index][1].modules():
                if id(module) not in self.processed:
                    process_module(module, self.prepack)
                    self.processed.add(id(module))
            self.keyed[index] = _keyed_bytes(self.units[index][1])
        for index in indices:
            self._store(index)
        # A mapped table stays, even where another unit held the same Parameter before processing replaced
        # it there (a tied head that became panels or codes). The rest is freed, placeholders in its place.
        in_use = {id(p) for i in self.mapped for p in self.units[i][1].parameters()}
        for index in indices:
            name, module = self.units[index]
            if index not in self.mapped:
                for tensor_name, placeholder in self.stored[name].placeholders.items():
                    _put(module, tensor_name, placeholder)
                for param in self.params[index]:
                    if id(param) not in in_use:
                        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        _return_freed_memory()

    def _store(self, index: int) -> None:
        name, module = self.units[index]
        tensors = unit_tensors(module)
        if self._mappable(index, tensors):
            self._map(index, module)
        else:
            self.tier.store(name, tensors)
            self.stored[name] = StoredUnit.of(tensors, self.tier.device)

    def _mappable(self, index: int, tensors: dict[str, torch.Tensor]) -> bool:
        """An untied embedding of one table on CPU: read by rows from a file instead of streamed."""
        name, module = self.units[index]
        if name != "embedding" or list(tensors) != ["weight"] or self.tier.device.type != "cpu":
            return False
        return not any(p is module.weight for i, (_, other) in enumerate(self.units) if i != index
                       for p in other.parameters())

    def _map(self, index: int, module: nn.Module) -> None:
        weight = module.weight
        source = self.sources.get(id(weight))
        file = self.checkpoint_files.get(source) if source else None
        if file is not None:
            table = map_checkpoint_tensor(file, source)
            self.mapped[index] = f"the checkpoint's own {file.name}"
        else:
            table = self.tier.map_rows("embedding", weight.data)
            self.mapped[index] = "its raw copy in the offload folder"
        _put(module, "weight", table)

    def finish(self, prefetch: bool, resident_bytes: int | None = None,
               offload_bytes: int | None = None) -> WeightStreamer:
        """Processes what is in no unit, keeps resident the units that fit ``resident_bytes`` (or all but
        ``offload_bytes``; read back from the tier) and streams the rest."""
        incomplete = [self.units[i][0] for i, needed in enumerate(self.needed) if needed]
        if incomplete:
            raise RuntimeError(f"units {incomplete} never received all their weights")
        # Units that had nothing to load (a tied GGUF head holds the embedding's blocks, read at build).
        self._complete([i for i in range(len(self.units)) if i not in self.keyed])
        self.model.to(self.tier.device)  # what is in no unit (norms, rotary tables) and the placeholders
        process_weights_after_loading(self.model, self.prepack, skip=self.processed)
        names = [name for name, _ in self.units]
        keyed = [self.keyed[i] for i in range(len(self.units))]
        in_units = {id(t) for _, module in self.units for t in unit_tensors(module).values()}
        outside = tensor_bytes([t for t in unit_tensors(self.model).values() if id(t) not in in_units])
        total = outside + sum({key: size for tensors in keyed for key, size in tensors.items()}.values())
        chosen = choose_offloaded(names, keyed, total, offload_bytes, resident_bytes)
        for index, (name, module) in enumerate(self.units):
            if index in chosen:
                continue
            if index in self.mapped:  # it fits after all: into memory
                _put(module, "weight", module.weight.data.clone())
                del self.mapped[index]
            else:
                for tensor_name, tensor in self.tier.take_back(name).items():
                    _put(module, tensor_name, tensor)
                del self.stored[name]
        streamed = [(name, module) for index, (name, module) in enumerate(self.units)
                    if index in chosen and index not in self.mapped]
        if isinstance(self.tier, SplitTier):  # the first units to stream go to pinned memory while they fit
            self.tier.place([name for name, _ in streamed], [self.stored[name].nbytes for name, _ in streamed])
        streamer = WeightStreamer(streamed, self.tier, prefetch, stored=self.stored)
        streamer.stats.mapped_bytes = tensor_bytes([t for i in self.mapped
                                                    for t in unit_tensors(self.units[i][1]).values()])
        streamer.stats.mapped_from = next(iter(self.mapped.values()), None)
        _return_freed_memory()
        report_offload(self.model, streamer, len(self.units), resident_bytes)
        return streamer


def load_within_budget(config, device: torch.device):
    """``load_for_engine`` with weight offload, offloading each unit as it loads: ``offload_folder`` with
    ``max_weight_memory`` (any device), ``cpu_offload_gb`` (CUDA), or both (CUDA: what leaves the GPU goes
    to pinned memory up to ``cpu_offload_gb``, the rest to files). On a GPU the model is built on the CPU
    (untouched memory) and each unit moves to the GPU when complete. Returns (model, model_config)."""
    check_cpu_offload_device(config, device)
    cpu = torch.device("cpu")
    module, model_config, weights, path = open_model(config.model, config.dtype, device, config.quantization,
                                                     config.load_time_quantization(), build_device=cpu,
                                                     quantize_lm_head=config.quantize_lm_head)
    disk, pinned = config.offload_folder is not None, int(config.cpu_offload_gb * 2**30)
    if disk and pinned:
        tier = SplitTier(HostTier(device), DiskTier(config.offload_folder, device), pinned)
    else:
        tier = DiskTier(config.offload_folder, device) if disk else HostTier(device)
    files = safetensors_tensor_files(path) if weights is not None and Path(path).is_dir() else {}
    assembler = UnitAssembler(module, tier, config.prepack_weights, files)
    fill_weights(module, weights, config.seed, on_loaded=assembler.loaded)
    streamer = assembler.finish(config.offload_prefetch, resident_bytes=config.max_weight_memory if disk else None,
                                offload_bytes=None if disk else pinned)
    module.weight_streamer = streamer
    return module, model_config
