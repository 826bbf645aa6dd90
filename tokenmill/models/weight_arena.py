"""``gather_weights``: a CPU model's decode-path weights moved into one region backed by 2 MiB pages.

A decode step streams every linear layer's weights (88 MB for SmolLM2-135M in int4, 268 MB in bf16).
Held as separate tensors on 4 KiB pages, that stream takes a page walk every 4 KiB: ~33,000 per int8
step, which also evict the translations of everything else the step and the interpreter touch. One
anonymous mapping advised ``MADV_HUGEPAGE`` (transparent huge pages; Linux, THP in ``madvise`` or
``always`` mode) holds them in ~2 MiB pages instead, laid out in the order a step reads them. Measured
on a 2-core Zen 3 with THP on for the whole process: batch-1 decode took 0.91x (bf16), 0.94x (int8)
and 0.99x (int4) of the time on 4 KiB pages.

Only tensors that own their whole storage move (a view into another tensor keeps its place), and
each moves by one copy into the region, then its old memory is freed, so the peak is the model plus
its largest tensor. Values are bit-identical. ``TOKENMILL_NO_HUGE_PAGES=1`` turns it off.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from tokenmill.logger import get_logger

logger = get_logger(__name__)

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # each tensor's start: a cache line, as the vector kernels load them
MIN_BYTES = HUGE_PAGE  # less than a huge page of weights stays where it is


def huge_pages_supported() -> bool:
    """Whether this system can advise huge pages at all (Linux with transparent huge pages not ``never``)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def gather_weights(model: nn.Module) -> int:
    """Moves the weights of ``model``'s linear layers and norms (not its embedding tables, of which a
    step reads one row) into one huge-page region; returns the bytes moved (0 where nothing moved: huge
    pages unsupported or switched off, a model on another device, or under 2 MiB of weights)."""
    if os.environ.get("TOKENMILL_NO_HUGE_PAGES") == "1" or not huge_pages_supported():
        return 0
    slots: dict[int, tuple[list[Place], int]] = {}  # storage address -> (its holders, its bytes)
    for place, tensor in _movable_slots(model):
        slots.setdefault(tensor.untyped_storage().data_ptr(), ([], tensor.nbytes))[0].append(place)
    tensor = None  # only the holders keep the old tensors now
    total = sum(_aligned(nbytes) for _, nbytes in slots.values())
    if total < max(MIN_BYTES, 1):
        return 0
    # Private: a shared anonymous mapping would be shmem, which takes huge pages only where shmem_enabled says.
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # + room to align
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as error:
        logger.debug("weights stay on small pages: madvise(MADV_HUGEPAGE) failed: %s", error)
        return 0
    memory = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping until its last view goes
    offset = -memory.data_ptr() % HUGE_PAGE
    for places, nbytes in slots.values():  # in the order first met; each old tensor goes once replaced
        block = memory[offset:offset + nbytes]
        for i, place in enumerate(places):  # holders of one storage (tied weights) keep sharing it
            old = place()
            new = block.view(old.dtype).view(old.shape)
            if i == 0:
                new.copy_(old)
            place(new)
        del old
        offset += _aligned(nbytes)
    logger.debug("weights gathered on huge pages: %.1f MB", total / 1e6)
    return total


Place = Callable[..., torch.Tensor]
"""``place()`` returns a slot's tensor; ``place(new)`` puts ``new`` there."""


def _movable_slots(model: nn.Module) -> Iterator[tuple[Place, torch.Tensor]]:
    """Each movable tensor of the model's linear layers and norms (their submodules included), once per
    holder, in module order (the order a forward pass reads them)."""
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.norm import LayerNorm, RMSNorm

    seen: set[int] = set()
    for owner in model.modules():
        if not isinstance(owner, (Linear, RMSNorm, LayerNorm)):
            continue
        for module in owner.modules():
            for param in module.parameters(recurse=False):
                if id(param) not in seen and _movable(param):  # a Parameter shared by two layers: once
                    seen.add(id(param))
                    yield _parameter_place(param), param.data
            for name, buffer in module.named_buffers(recurse=False):
                if _movable(buffer):
                    yield _buffer_place(module, name), buffer
            packed = getattr(module, "packed_weight", None)
            if isinstance(packed, torch.Tensor) and _movable(packed):
                yield _attribute_place(module, "packed_weight"), packed


def _movable(tensor: torch.Tensor) -> bool:
    """A plain CPU tensor that owns all of its storage (not a view of another, nor oneDNN's opaque layout)."""
    return (tensor.device.type == "cpu" and tensor.layout == torch.strided and tensor.is_contiguous()
            and tensor.numel() > 0 and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.nbytes)


def _parameter_place(param: nn.Parameter) -> Place:
    def place(new: torch.Tensor | None = None) -> torch.Tensor:
        if new is not None:
            param.data = new  # the Parameter object stays (tied weights share it)
        return param.data
    return place


def _buffer_place(module: nn.Module, name: str) -> Place:
    def place(new: torch.Tensor | None = None) -> torch.Tensor:
        if new is not None:
            module._buffers[name] = new
        return module._buffers[name]
    return place


def _attribute_place(module: nn.Module, name: str) -> Place:
    def place(new: torch.Tensor | None = None) -> torch.Tensor:
        if new is not None:
            setattr(module, name, new)
        return getattr(module, name)
    return place


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT
