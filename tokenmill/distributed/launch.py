"""Ranks started by ``torchrun`` (one machine or several) instead of by the engine.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0|1 --master-addr HOST --master-port PORT \\
        -m tokenmill serve MODEL [--tensor-parallel-size 4]

Every process runs the same command. Global rank 0 serves (its engine core is tensor-parallel rank
0); every other rank loads its slice and runs the worker loop. The ranks meet in torchrun's store
at MASTER_ADDR:MASTER_PORT (the agent's, or rank 0's when the agent keeps none), under a prefix of
their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchedRank:
    """This process's place in a torchrun launch (from the environment torchrun sets)."""

    rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    agent_store: bool
    """torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): every rank connects as a client."""


def torchrun_rank() -> LaunchedRank | None:
    """This process's rank when torchrun started it with more than one process, else None."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or int(env["WORLD_SIZE"]) <= 1:
        return None
    return LaunchedRank(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                        local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                        master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env["MASTER_PORT"]),
                        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def launched_tensor_parallel_size(requested: int, launched: LaunchedRank) -> int:
    """The tensor-parallel degree of a torchrun launch: every process is a rank, so it is the world size."""
    if requested not in (1, launched.world_size):
        raise ValueError(f"tensor_parallel_size {requested} does not match torchrun's {launched.world_size} "
                         "processes; leave it out or give the world size")
    return launched.world_size
