"""A tensor-parallel worker rank: load this rank's slice of the model, then run every step rank 0 sends.

Rank 0 (the engine's process) broadcasts each step's ``SchedulerOutput``; the worker runs the same
forward pass (its collectives pair with rank 0's) without sampling, and stops at ``None`` or when
rank 0 goes away (a collective fails after the group's timeout, or at once on a closed socket).
"""

from __future__ import annotations

import torch

from tokenmill.logger import get_logger

logger = get_logger(__name__)


def worker_main(rank: int, size: int, port: int, config, num_threads: int, host: str = "127.0.0.1") -> None:
    """Entry point of worker ``rank`` (1 .. size - 1), started by ``TensorParallelExecutor`` (or by torchrun:
    ``tokenmill serve`` on a rank other than 0), whose rank 0 keeps the store at host:port."""
    from tokenmill.attention.registry import create_backend
    from tokenmill.distributed.parallel_state import TensorParallelGroup, building_for
    from tokenmill.config import resolve_device
    from tokenmill.models.loader import load_model
    from tokenmill.runner.model_runner import ModelRunner

    torch.set_num_threads(num_threads)
    store = TensorParallelGroup.connect(host, port, size, config.distributed_timeout_s)
    group = TensorParallelGroup.join(rank, size, config.distributed_timeout_s, store,
                                     expert_parallel=config.enable_expert_parallel)
    device = resolve_device(config.device)
    with building_for(group):
        model, _ = load_model(config.model, config.dtype, device, seed=config.seed, quantization=config.quantization,
                              load_time_quantization=config.load_time_quantization(),
                              prepack=config.prepack_weights)
    num_blocks = group.broadcast_object()
    runner = ModelRunner(model, create_backend(config.attention_backend, device), num_blocks,
                         config.cache.block_size, next(model.parameters()).dtype, device, [],
                         config.cache.kv_cache_dtype)
    while (message := group.broadcast_object()) is not None:
        kind, scheduler_output = message
        if kind == "logits":
            runner.execute_logits(scheduler_output)
        else:
            runner.execute(scheduler_output, sample=False)
