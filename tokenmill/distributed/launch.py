"""Ranks started by ``torchrun`` (one machine or several) instead of by the engine.

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0|1 --master-addr HOST --master-port PORT \\
        -m tokenmill serve MODEL [--pipeline-parallel-size 2]

Every process runs the same command. Global rank 0 serves (its engine core is rank 0 of the
engine); every other rank loads its part and runs the worker loop. The tensor-parallel degree is
the world size over the pipeline degree. The ranks meet in torchrun's store
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


def launched_tensor_parallel_size(requested: int, pipeline_parallel_size: int, launched: LaunchedRank) -> int:
    """The tensor-parallel degree of a torchrun launch: every process is a rank, so it is the world size
    over the pipeline degree."""
    tp, rest = divmod(launched.world_size, pipeline_parallel_size)
    if rest or requested not in (1, tp):
        raise ValueError(f"tensor_parallel_size {requested} x pipeline_parallel_size {pipeline_parallel_size} does "
                         f"not match torchrun's {launched.world_size} processes; give a pipeline degree that divides "
                         "it and leave the tensor degree out (or give world size / pipeline degree)")
    return tp
