"""KVCacheManager: per-request block tables over the BlockPool, with automatic prefix caching.

Block i of a request holds the K/V of its tokens [i*block_size, (i+1)*block_size). Once all of
those tokens are computed the block is *full*: it is hashed (chained on the previous block's
hash) so that a later request whose tokens start the same way can reuse it.

With a block store (KV tiers, ``offload/kv_tiers.py``), a cached block that the pool evicts is saved
there first, and a prefix that runs past the pool's hits continues into the store: those blocks get
fresh device blocks and their bytes are loaded in before the step's forward. The manager only decides;
the moves are queued for the runner (``take_kv_transfers``), saves before loads before the forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.request import Request
from tokenmill.scheduler.block_pool import BlockPool, KVBlock, hash_block

if TYPE_CHECKING:
    from tokenmill.offload.kv_tiers import TieredBlockStore


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 block_store: TieredBlockStore | None = None):
        """``block_store``: the KV tiers behind the pool (its ``contains`` and ``get`` are used here)."""
        self.block_size = block_size
        self.block_store = block_store if enable_caching else None
        self.pool = BlockPool(num_blocks, enable_caching, self._on_evict if self.block_store else None)
        self.pending_saves: list[tuple[int, bytes]] = []
        """(block id, hash) of evicted blocks whose contents the runner saves to the store before the forward."""
        self.pending_loads: dict[int, tuple[bytes, object]] = {}
        """Block id -> (hash, bytes from the store) that the runner writes into the block before the forward."""
        self.num_restored_tokens = 0
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}
        self.pending_copies: list[tuple[int, int]] = []
        """(source block, destination block) copies the runner must do before the next forward."""
        self.replaced: set[str] = set()
        """Requests whose block table changed in place (copy-on-write) since ``take_copies``."""
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def _hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """The request's chained block hashes for its first ``num_full_blocks`` blocks (memoised)."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Leading blocks of the request already in the prefix cache, and how many tokens they hold.

        At least one token is always left to compute, so that the step yields logits.
        Does not take references: pass the blocks to ``allocate_slots``.
        """
        if not self.pool.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position computed
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in self._hashes(request, max_blocks):
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def find_in_tiers(self, request: Request, num_computed_blocks: int) -> list[bytes]:
        """Hashes of the blocks after the request's ``num_computed_blocks`` pool hits that the block store
        holds, in order (to restore once the request has blocks); the last token is always left to compute."""
        if self.block_store is None or request.sampling_params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = []
        for block_hash in self._hashes(request, max_blocks)[num_computed_blocks:]:
            if not self.block_store.contains(block_hash):
                break
            found.append(block_hash)
        return found

    def restore_from_tiers(self, request: Request, num_computed_blocks: int, block_hashes: list[bytes]) -> int:
        """Queues loads of ``block_hashes`` (from ``find_in_tiers``) into the request's blocks after its
        ``num_computed_blocks`` pool hits, stopping at the first block the store cannot give back intact;
        registers the loaded blocks in the prefix cache. Returns the number of tokens restored."""
        blocks = self.req_blocks[request.request_id][num_computed_blocks:]
        num_restored = 0
        for block, block_hash in zip(blocks, block_hashes):
            data = self.block_store.get(block_hash)
            if data is None:
                break  # missing or corrupt: recomputed from here
            self.pending_loads[block.block_id] = (block_hash, data)
            self.pool.cache_block(block, block_hash)
            num_restored += 1
        return num_restored * self.block_size

    def _on_evict(self, block: KVBlock, block_hash: bytes) -> None:
        if self.pending_loads.pop(block.block_id, None) is not None:
            return  # restored and evicted again before the load: the store still holds it
        if not self.block_store.contains(block_hash):
            self.pending_saves.append((block.block_id, block_hash))

    def take_kv_transfers(self) -> tuple[list[tuple[int, bytes]], list[tuple[int, object]]]:
        """(saves: (block id, hash), loads: (block id, bytes)) queued since the last call (then forgotten)."""
        saves, self.pending_saves = self.pending_saves, []
        loads = [(block_id, data) for block_id, (_, data) in self.pending_loads.items()]
        self.pending_loads = {}
        return saves, loads

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int, num_restored_tokens: int = 0) -> None:
        """Counts one admitted request's prefix lookup (not the attempts that found no room): tokens found
        in the device pool, and those restored from the KV tiers."""
        if self.pool.enable_caching:
            self.num_queried_tokens += num_tokens
            self.num_hit_tokens += num_hit_tokens
            self.num_restored_tokens += num_restored_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Makes room for ``num_new_tokens`` more tokens; False (and no change) if blocks run out."""
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_new_blocks = num_needed - len(blocks) - len(computed_blocks)
        write_index = num_computed // self.block_size  # the first block this step writes into
        copy_on_write = num_new_tokens > 0 and write_index < len(blocks) and blocks[write_index].ref_cnt > 1
        # Hits that sit in the free queue stop being available once we take them.
        num_reclaimed = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + copy_on_write > self.pool.num_free_blocks - num_reclaimed:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        if copy_on_write:
            shared = blocks[write_index]
            blocks[write_index] = self.pool.get_new_blocks(1)[0]
            self.pool.free_blocks([shared])  # still held by the other sharers
            self.pending_copies.append((shared.block_id, blocks[write_index].block_id))
            self.replaced.add(request.request_id)
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        return True

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """How many blocks ``allocate_slots(request, num_new_tokens)`` would take (no prefix hits, no copy)."""
        held = len(self.req_blocks.get(request.request_id, []))
        return max(0, -(-(request.num_computed_tokens + num_new_tokens) // self.block_size) - held)

    def fork(self, parent: Request, child: Request) -> None:
        """Gives ``child`` the parent's blocks (shared, by reference count) and prefix hashes."""
        blocks = self.req_blocks[parent.request_id]
        self.pool.touch(blocks)
        self.req_blocks[child.request_id] = list(blocks)
        # The parent's hashes cover full computed blocks only: tokens the child shares.
        self.req_hashes[child.request_id] = list(self.req_hashes.get(parent.request_id, []))

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copy-on-write copies whose destination is still held (then forgets them)."""
        copies = [(src, dst) for src, dst in self.pending_copies if self.pool.blocks[dst].ref_cnt > 0]
        self.pending_copies = []
        self.replaced.clear()
        return copies

    def cache_blocks(self, request: Request) -> None:
        """Registers the request's newly full blocks (up to num_computed_tokens) in the prefix cache."""
        if not self.pool.enable_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        for block, block_hash in zip(blocks[:num_full], self._hashes(request, num_full)):
            self.pool.cache_block(block, block_hash)

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first so that tails are evicted before heads."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free_blocks(reversed(blocks))
        self.req_hashes.pop(request.request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.req_blocks.values())
