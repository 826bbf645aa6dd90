"""KVBlockTransfer: moves whole KV blocks between the device's caches and the KV tiers.

A block travels as one flat byte row: for each layer in order, each of its cache tensors' slice at
that block (K and V; a quantized cache adds its scales), flattened. Every cache tensor holds blocks
along dimension 1: a float cache (2, num_blocks, block_size, nkv, d), int8 codes the same and their
scales (2, num_blocks, block_size, nkv). Example: 2 layers of a float32 cache with block_size 16, 1 KV
head of 8 -> each layer's slice is (2, 16, 1, 8) = 1024 bytes, and a row is 2048 bytes.

Reads and writes are batched: one gather (or scatter) per cache tensor for all the step's blocks.
"""

from __future__ import annotations

import torch

from tokenmill.attention.kv_quant import Fp8KVCache, Int8KVCache


def _block_tensors(kv_caches: list) -> list[torch.Tensor]:
    """Each layer's cache tensors that hold per-block data, in row order."""
    tensors = []
    for cache in kv_caches:
        if isinstance(cache, Int8KVCache):
            tensors += [cache.codes, cache.scales]
        elif isinstance(cache, Fp8KVCache):  # its two scales are fixed for the engine's life
            tensors.append(cache.codes)
        else:
            tensors.append(cache)
    return tensors


class KVBlockTransfer:
    def __init__(self, kv_caches: list, device: torch.device):
        self.tensors = _block_tensors(kv_caches)
        self.device = device
        self.widths = [t[:, 0].numel() * t.element_size() for t in self.tensors]  # bytes of one block
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.bytes_per_block = sum(self.widths)
        self._buffers: dict[str, torch.Tensor] = {}  # reused host rows (pinned on CUDA): no page faults per step
        self._load_done = None  # on CUDA: the event after which the load buffer may be refilled

    def _host_rows(self, name: str, n: int) -> torch.Tensor:
        """(n, bytes_per_block) uint8 rows of the reused host buffer ``name`` (grown when too small)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < n:
            buffer = torch.empty(max(n, 2 * buffer.shape[0] if buffer is not None else n), self.bytes_per_block,
                                 dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._buffers[name] = buffer
        return buffer[:n]

    def _parts(self, rows: torch.Tensor):
        """(cache tensor, its slice of ``rows`` (n, B) viewed as (n, 2, ...) in the cache's dtype)."""
        n = rows.shape[0]
        for t, offset, width in zip(self.tensors, self.offsets, self.widths):
            yield t, rows[:, offset:offset + width].view(t.dtype).view(n, 2, *t.shape[2:])

    def read(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' contents (n, bytes_per_block) uint8 on the CPU: rows of a reused buffer, valid until
        the next ``read``."""
        index = torch.tensor(block_ids, device=self.device)
        n = len(block_ids)
        host = self._host_rows("save", n)
        gathered = host if self.device.type == "cpu" else torch.empty_like(host, device=self.device)
        for t, part in self._parts(gathered):
            part.copy_(t.index_select(1, index).transpose(0, 1))
        if gathered is not host:
            host.copy_(gathered)
        return host

    def write(self, block_ids: list[int], rows: torch.Tensor) -> None:
        """Writes ``rows`` (n, bytes_per_block) uint8 into the blocks."""
        index = torch.tensor(block_ids, device=self.device)
        rows = rows.to(self.device, non_blocking=True)
        for t, part in self._parts(rows):
            t[:, index] = part.transpose(0, 1)

    def apply(self, saves: list[tuple[int, bytes]], loads: list[tuple[int, torch.Tensor]], store) -> None:
        """A step's moves: the evicted blocks' contents read (before anything overwrites them), the restored
        blocks' bytes written into their device blocks, then the saved contents put into ``store`` (after
        the loads: a memory tier's ``get`` gives views of its slots, which a ``put`` may reuse)."""
        saved = self.read([block_id for block_id, _ in saves]) if saves else None
        if self._load_done is not None:  # the last loads' copies out of host memory have finished
            self._load_done.synchronize()
            self._load_done = None
        if loads:
            block_ids = [block_id for block_id, _ in loads]
            if self.device.type == "cuda":  # each row straight from the tier's (pinned) memory to the GPU
                rows = torch.empty(len(loads), self.bytes_per_block, dtype=torch.uint8, device=self.device)
                for row, (_, data) in zip(rows, loads):
                    row.copy_(data, non_blocking=True)
                self.write(block_ids, rows)
                self._load_done = torch.cuda.Event()
                self._load_done.record()
                if saves:  # the puts below may reuse the slots those copies read
                    self._load_done.synchronize()
            else:
                self.write(block_ids, torch.stack([data for _, data in loads], out=self._host_rows("load", len(loads))))
        for row, (_, block_hash) in enumerate(saves):
            store.put(block_hash, saved[row])
