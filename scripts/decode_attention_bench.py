"""Time of the C++ paged decode-attention kernel per layer, with the cache out of L2 as in a real step.

    .venv/bin/python scripts/decode_attention_bench.py [--threads 2] [--layout contiguous|shuffled] [--hot]

The `smollm2-135m` shape (9 query heads, 3 KV heads of 64, blocks of 16 tokens, bf16): 30 layers'
caches, each layer attended once per pass with 2 MB of other memory read in between (a layer's
int4 weights are ~2.2 MB), best of 7 passes. `contiguous`: each request's blocks follow each other
(a fresh pool); `shuffled`: blocks in random order (a pool after much churn). `--hot`: one layer's
cache attended 200 times in a row (in L2/L3: the kernel's arithmetic, without DRAM).
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.kernels import cpu_kernels

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16
CASES = ((1, 200), (1, 1000), (4, 200), (32, 256))  # (batch, context tokens)


def time_case(kernels, batch: int, context: int, shuffled: bool, hot: bool = False) -> float:
    """Microseconds per layer for one decode step of `batch` requests of `context` tokens."""
    per_request = -(-context // BLOCK)
    blocks = batch * per_request
    caches = [torch.randn(2, blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(LAYERS)]
    order = torch.randperm(blocks) if shuffled else torch.arange(blocks)
    tables = order.view(batch, per_request).contiguous()  # (batch, blocks per request)
    lens = torch.full((batch,), context, dtype=torch.int64)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    other = torch.ones(1 << 19)  # 2 MB read between layers
    best = float("inf")
    if hot:
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(200):
                kernels.paged_decode_attention(q, caches[0][0], caches[0][1], tables, lens, HEAD_DIM ** -0.5)
            best = min(best, (time.perf_counter() - start) / 200)
        return best * 1e6
    for _ in range(7):
        total = 0.0
        for cache in caches:
            other.sum()
            start = time.perf_counter()
            kernels.paged_decode_attention(q, cache[0], cache[1], tables, lens, HEAD_DIM ** -0.5)
            total += time.perf_counter() - start
        best = min(best, total)
    return best / LAYERS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layout", choices=("contiguous", "shuffled"), default="contiguous")
    parser.add_argument("--hot", action="store_true", help="one layer's cache, attended 200 times in a row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the C++ CPU kernels could not be built here")
    torch.manual_seed(0)
    for batch, context in CASES:
        micros = time_case(kernels, batch, context, args.layout == "shuffled", args.hot)
        print(f"batch {batch:2d}, {context:4d} tokens ({args.layout}{', hot' if args.hot else ''}): "
              f"{micros:7.1f} us per layer")


if __name__ == "__main__":
    main()
