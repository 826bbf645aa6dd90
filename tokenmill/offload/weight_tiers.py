"""Where offloaded weight units live between their forward passes (``weights.py`` streams them):

- ``HostTier`` (CUDA, ``cpu_offload_gb``): pinned host memory, copied to the GPU on a side stream;
- ``DiskTier`` (any device, ``offload_folder``): one safetensors file per unit, read back by a thread;
- ``SplitTier`` (CUDA, both): the first units in pinned memory up to its size, the rest on disk.

Every tier: ``store(key, tensors)``, ``fetch(key)`` (starts moving it to the device), ``ready(fetched)``
(its tensors there, the compute stream ordered after the copy), ``take_back(key)`` (back for good),
``close()``; ``device`` and ``name``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch


class HostTier:
    """Offloaded units in pinned host memory; copies to the CUDA device run on a side stream."""

    def __init__(self, device: torch.device):
        self.device, self.name = device, "pinned CPU memory"
        self._stream = torch.cuda.Stream(device)
        self._units: dict[int, dict[str, torch.Tensor]] = {}

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._units[key] = {name: t.detach().cpu().pin_memory() for name, t in tensors.items()}

    def close(self) -> None:
        """Frees the pinned memory."""
        self._units.clear()

    def take_back(self, key: str) -> dict[str, torch.Tensor]:
        """Unit ``key``'s tensors on the device; its pinned copy is freed (the unit stays resident)."""
        return {name: t.to(self.device) for name, t in self._units.pop(key).items()}

    def fetch(self, key: str):
        """Starts copying unit ``key`` to the device; ``ready`` makes the compute stream wait for it."""
        with torch.cuda.stream(self._stream):
            copies = {name: t.to(self.device, non_blocking=True) for name, t in self._units[key].items()}
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                       torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written from the tensors' own memory (``save_file`` first copies each into a bytes
    object, which would double a large unit's footprint while it is stored). Tensors: contiguous, on CPU."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


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

    def _path(self, key: str) -> Path:
        return self.folder / f"unit-{key.replace(' ', '-')}.safetensors"

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        packed = [name for name, t in tensors.items() if t.layout == torch._mkldnn]
        plain = {name: (t.to_dense() if name in packed else t).detach().cpu().contiguous()
                 for name, t in tensors.items()}
        write_safetensors(self._path(key), plain, {"prepacked": ",".join(packed)})

    def fetch(self, key: str) -> Future:
        return self._reader.submit(self._read, key)

    def take_back(self, key: str) -> dict[str, torch.Tensor]:
        """Unit ``key``'s tensors, read now; its file is removed (the unit stays resident)."""
        tensors = self._read(key)
        self.remove(key)
        return tensors

    def read_host(self, key: str) -> dict[str, torch.Tensor]:
        """Unit ``key``'s tensors as stored (plain, on the CPU)."""
        from safetensors.torch import load_file

        return load_file(str(self._path(key)))

    def remove(self, key: str) -> None:
        self._path(key).unlink()

    def _read(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        from tokenmill.layers.quantization.methods import prepack_linear_weight

        with safe_open(str(self._path(key)), framework="pt") as f:
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


class SplitTier:
    """Units in pinned CPU memory up to ``host_bytes``, the others in files: FlexGen's CPU and disk
    tiers at once. Units are stored on disk first; ``place`` moves the ones that stream first into
    pinned memory while they fit."""

    def __init__(self, host: HostTier, disk: DiskTier, host_bytes: int):
        self.host, self.disk, self.host_bytes = host, disk, host_bytes
        self.device = host.device
        self._where: dict[str, HostTier | DiskTier] = {}
        self.host_used = 0

    @property
    def name(self) -> str:
        return f"{self.host.name} ({self.host_used / 2**20:.1f} MiB) and {self.disk.name}"

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.disk.store(key, tensors)
        self._where[key] = self.disk

    def place(self, keys: list[str], sizes: list[int]) -> None:
        """Moves units ``keys`` (in this order, ``sizes`` bytes each) from disk into pinned memory while
        they fit ``host_bytes``."""
        for key, size in zip(keys, sizes):
            if self.host_used + size > self.host_bytes:
                break
            self.host.store(key, self.disk.read_host(key))
            self.disk.remove(key)
            self._where[key] = self.host
            self.host_used += size

    def tier_of(self, key: str) -> HostTier | DiskTier:
        return self._where[key]

    def fetch(self, key: str):
        tier = self._where[key]
        return tier, tier.fetch(key)

    def ready(self, fetched) -> dict[str, torch.Tensor]:
        tier, pending = fetched
        return tier.ready(pending)

    def take_back(self, key: str) -> dict[str, torch.Tensor]:
        return self._where.pop(key).take_back(key)

    def close(self) -> None:
        self.host.close()
        self.disk.close()
