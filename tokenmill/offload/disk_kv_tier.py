"""DiskBlockStore: a KV tier of one file per block in a folder, written behind by a background thread.

A file is a fixed header followed by the block's bytes:

    magic (8 bytes) | block hash (32) | payload length (uint64) | CRC-32 of the payload (uint32) | payload

A read checks all four, so that a truncated, corrupted, renamed or missing file is never taken for
K/V: the block is dropped from the tier and the engine recomputes it. Files live in a fresh
subfolder of the configured folder (one per engine), removed when the engine shuts down or the
process exits; the hashes name token prefixes only, so files are not shared between engines.
"""

from __future__ import annotations

import queue
import shutil
import struct
import tempfile
import threading
import weakref
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from tokenmill.logger import get_logger
from tokenmill.offload.block_store import BlockStore

logger = get_logger(__name__)

_MAGIC = b"TMKVBLK1"
_HEADER = struct.Struct("<8s32sQI")


class DiskBlockStore(BlockStore):
    """Blocks as checksummed files; the most recent writes wait in memory until the writer has them on disk."""

    def __init__(self, folder: str | Path, disk_space: int, bytes_per_block: int):
        super().__init__()
        self.capacity_blocks = disk_space // (_HEADER.size + bytes_per_block)
        if self.capacity_blocks < 1:
            raise ValueError(f"kv_offload_disk_space {disk_space} bytes holds no KV block file of "
                             f"{_HEADER.size + bytes_per_block} bytes; give at least {_HEADER.size + bytes_per_block}")
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="tokenmill-kv-", dir=folder))
        self.name, self.location, self.bytes_per_block = "disk", str(self.folder), bytes_per_block
        self.files: OrderedDict[bytes, None] = OrderedDict()  # hashes held, least recently used first
        self.pending: dict[bytes, torch.Tensor] = {}  # put but not yet on disk
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="tokenmill-kv-disk-writer", daemon=True)
        self._writer.start()
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def path(self, block_hash: bytes) -> Path:
        return self.folder / f"{block_hash.hex()}.kv"

    def __len__(self) -> int:
        return len(self.files)

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self.files

    def put(self, block_hash: bytes, data: torch.Tensor) -> None:
        with self._lock:
            if block_hash in self.files:
                self.files.move_to_end(block_hash)
                return
            while len(self.files) >= self.capacity_blocks:
                old_hash, _ = self.files.popitem(last=False)
                self.pending.pop(old_hash, None)
                self._queue.put(("delete", old_hash, None))
                self.evictions += 1
            self.files[block_hash] = None
            self.pending[block_hash] = copy = data.clone()
            self.stores += 1
        self._queue.put(("write", block_hash, copy))

    def get(self, block_hash: bytes) -> torch.Tensor | None:
        with self._lock:
            if block_hash not in self.files:
                return None
            self.files.move_to_end(block_hash)
            waiting = self.pending.get(block_hash)
            if waiting is not None:
                self.hits += 1
                return waiting.clone()
        problem = None
        data = torch.empty(self.bytes_per_block, dtype=torch.uint8)
        try:
            with open(self.path(block_hash), "rb") as f:
                magic, stored_hash, length, crc = _HEADER.unpack(f.read(_HEADER.size))
                num_read = f.readinto(data.numpy())
        except (OSError, struct.error) as error:
            problem = f"unreadable ({error})"
        else:
            if magic != _MAGIC or stored_hash != block_hash or length != self.bytes_per_block:
                problem = "its header does not match the block"
            elif num_read != self.bytes_per_block:
                problem = f"it holds {num_read} of {self.bytes_per_block} bytes"
            elif zlib.crc32(data.numpy()) != crc:
                problem = "its checksum does not match"
        if problem is None:
            self.hits += 1
            return data
        logger.warning("KV tier file %s is %s: the block is recomputed", self.path(block_hash).name,
                       problem if problem.startswith("unreadable") else f"rejected: {problem}")
        with self._lock:
            if self.files.pop(block_hash, "absent") is None:
                self._queue.put(("delete", block_hash, None))
            self.failures += 1
        return None

    def _write_loop(self) -> None:
        while True:
            op, block_hash, data = self._queue.get()
            try:
                if op == "stop":
                    return
                path = self.path(block_hash)
                if op == "delete":
                    path.unlink(missing_ok=True)
                    continue
                with self._lock:
                    if self.pending.get(block_hash) is not data:
                        continue  # evicted (or written again) before its turn came
                payload = data.numpy()
                temporary = path.with_suffix(".tmp")
                with open(temporary, "wb") as f:
                    f.write(_HEADER.pack(_MAGIC, block_hash, payload.nbytes, zlib.crc32(payload)))
                    f.write(payload)
                temporary.replace(path)  # a reader sees the whole file or none
                with self._lock:
                    if self.pending.get(block_hash) is data:
                        del self.pending[block_hash]
            except OSError as error:  # a full or failing disk: the block is dropped, never half-read
                logger.warning("could not write KV tier file for a block (%s); it is dropped", error)
                with self._lock:
                    if self.pending.get(block_hash) is data:
                        del self.pending[block_hash]
                        self.files.pop(block_hash, None)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Waits until every block put so far is on disk (or dropped)."""
        self._queue.join()

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(("stop", None, None))
            self._writer.join()
        self._remove()
