"""Seeded synthetic workloads: random prompt token ids with random (or fixed) lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def synthetic_workload(num_requests: int, vocab_size: int, seed: int, input_len: int | None = None,
                       output_len: int | None = None, input_range: tuple[int, int] = (16, 512),
                       output_range: tuple[int, int] = (8, 256)) -> list[BenchRequest]:
    """``num_requests`` requests; fixed lengths where given, else uniform in the ranges (inclusive)."""
    rng = random.Random(seed)
    low_id = min(10, vocab_size - 1)  # stay clear of the usual special ids
    out = []
    for _ in range(num_requests):
        n_in = input_len or rng.randint(*input_range)
        n_out = output_len or rng.randint(*output_range)
        out.append(BenchRequest([rng.randrange(low_id, vocab_size) for _ in range(n_in)], n_out))
    return out
