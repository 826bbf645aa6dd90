"""``tokenmill bench kv-offload``: time to first token for a long shared prefix, served four ways.

Each iteration takes a new random prefix and asks for one token after it:
1. cold: nothing cached, the whole prompt is computed (what a lost prefix costs without a tier);
2. the same prefix again: the device pool's prefix cache has it;
3. the prefix evicted from the device pool into the KV tiers (as a full pool would), then asked again:
   restored from the tiers;
4. with a disk tier: evicted again and its files dropped from the OS page cache (``posix_fadvise``), so
   that the restore reads the disk itself.
"""

from __future__ import annotations

import os
import random
import statistics
from typing import Any

from tokenmill.bench.report import print_table, write_json
from tokenmill.llm import LLM
from tokenmill.offload.disk_kv_tier import DiskBlockStore
from tokenmill.sampling_params import SamplingParams


def _drop_page_cache(disk: DiskBlockStore) -> None:
    disk.flush()
    for path in disk.folder.glob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_kv_offload(llm: LLM, args) -> dict[str, Any]:
    core = llm.engine.core
    if core.block_store is None:
        raise SystemExit("bench kv-offload needs a KV tier: give --kv-offload-memory and/or --kv-offload-folder")
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def first_token(prompt: list[int]) -> tuple[float, int]:
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        return out.time_to_first_token, out.num_cached_tokens

    def evict() -> None:
        core.kv_cache_manager.pool.evict_cached_free_blocks()
        core.step()  # an empty step: the runner saves the evicted blocks into the tiers
        for tier in core.block_store.tiers:
            if isinstance(tier, DiskBlockStore):
                tier.flush()

    disks = [tier for tier in core.block_store.tiers if isinstance(tier, DiskBlockStore)]
    first_token([rng.randrange(3, vocab) for _ in range(64)])  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"recomputed": [], "device prefix hit": [], "from the tiers": []}
    if disks:
        runs["from disk, page cache dropped"] = []
    before = [s.hits for s in core.block_store.stats()]
    for _ in range(args.num_iters):
        prefix = [rng.randrange(3, vocab) for _ in range(args.prefix_len)]
        runs["recomputed"].append(first_token(prefix + [rng.randrange(3, vocab)]))
        runs["device prefix hit"].append(first_token(prefix + [rng.randrange(3, vocab)]))
        evict()
        runs["from the tiers"].append(first_token(prefix + [rng.randrange(3, vocab)]))
        if disks:
            evict()
            _drop_page_cache(disks[-1])
            runs["from disk, page cache dropped"].append(first_token(prefix + [rng.randrange(3, vocab)]))
    hits = {s.name: s.hits - b for s, b in zip(core.block_store.stats(), before)}
    result = {"model": args.model, "prefix_len": args.prefix_len, "num_iters": args.num_iters,
              "bytes_per_block": core.block_store.bytes_per_block, "tier_block_hits": hits,
              "tiers": [s.describe() for s in core.block_store.stats()]}
    rows = [("prefix tokens", args.prefix_len), ("KV tiers", "; ".join(result["tiers"])),
            ("blocks restored, by tier", ", ".join(f"{name} {n}" for name, n in hits.items()))]
    for name, measured in runs.items():
        ttft_ms = 1000 * statistics.median(t for t, _ in measured)
        cached = min(c for _, c in measured)
        result[name.replace(" ", "_").replace(",", "")] = {"ttft_ms": ttft_ms, "num_cached_tokens": cached}
        rows.append((f"TTFT {name} (ms)", f"{ttft_ms:,.1f}  ({cached} tokens cached)"))
    recomputed = result["recomputed"]["ttft_ms"]
    rows.append(("speed-up of the tiers over recomputing", f"{recomputed / result['from_the_tiers']['ttft_ms']:.1f}x"))
    print_table(f"KV offload: time to first token after a {args.prefix_len}-token prefix, {args.model}", rows)
    write_json(args.output_json, result)
    return result
