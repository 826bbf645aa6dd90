"""A worker rank: load this rank's part of the model, then run every step that reaches it.

A rank of pipeline stage 0 gets each step (kind, ``SchedulerOutput``) from rank 0; a rank of a
later stage gets it, with the previous stage's hidden state and residual, from the same
tensor-parallel rank of the previous stage. It runs its layers (its collectives pair with the
rest of its stage's) and hands the result on: to the next stage, or, on the last stage's
tensor-parallel rank 0, which samples, back to rank 0 as a ``ModelRunnerOutput``. It stops at
"stop" (passing it on first) or when the rank before it goes away.
"""

from __future__ import annotations

import torch

from tokenmill.logger import get_logger

logger = get_logger(__name__)


def worker_main(rank: int, size: int, port: int, config, num_threads: int, host: str = "127.0.0.1") -> None:
    """Entry point of worker ``rank`` (1 .. size - 1), started by ``DistributedExecutor`` (or by torchrun:
    ``tokenmill serve`` on a rank other than 0), whose rank 0 keeps the store at host:port."""
    from tokenmill.attention.registry import create_backend
    from tokenmill.config import resolve_device
    from tokenmill.distributed.channel import RESULT_TAGS, Channel
    from tokenmill.distributed.parallel_state import (ParallelLayout, PipelineStage, TensorParallelGroup,
                                                      building_for, join_gloo)
    from tokenmill.engine.model_loading import load_for_engine
    from tokenmill.models.pipeline import StageTensors
    from tokenmill.runner.model_runner import ModelRunner

    torch.set_num_threads(num_threads)
    layout = ParallelLayout(config.tensor_parallel_size, config.pipeline_parallel_size)
    assert layout.world_size == size, f"{size} ranks for a layout of {layout.world_size}"
    stage, tp_rank = PipelineStage(layout.stage_of(rank), layout.pipeline_parallel_size), layout.tp_rank_of(rank)
    timeout = config.distributed_timeout_s
    store = TensorParallelGroup.connect(host, port, size, timeout)
    TensorParallelGroup.mark_started(store, rank)
    group = TensorParallelGroup.join(tp_rank, layout.tensor_parallel_size, timeout, store,
                                     expert_parallel=config.enable_expert_parallel, name=f"tp{stage.rank}")
    channel = Channel(join_gloo(rank, size, timeout, store, "world"))
    device = resolve_device(config.device)
    with building_for(group, stage):
        model, _ = load_for_engine(config, device)
    (num_blocks, kv_dtype, eos_token_ids), _ = channel.recv(0, wait_without_limit=True)  # rank 0 may load for long
    runner = ModelRunner(model, create_backend(config.attention_backend, device), num_blocks,
                         config.cache.block_size, kv_dtype, device, eos_token_ids, config.cache.kv_cache_dtype)
    previous = 0 if stage.is_first else layout.rank_of(stage.rank - 1, tp_rank)
    following = None if stage.is_last else layout.rank_of(stage.rank + 1, tp_rank)
    while True:
        (kind, scheduler_output), tensors = channel.recv(previous, wait_without_limit=True)
        if kind == "stop":
            if following is not None:
                channel.send(following, (kind, None))
            channel.flush()
            return
        received = None if stage.is_first else StageTensors({name: t.to(device) for name, t in tensors.items()})
        if kind == "logits":
            output = runner.execute_logits(scheduler_output, received)
        else:
            output = runner.execute(scheduler_output, sample=tp_rank == 0, received=received)
        if following is not None:
            channel.send(following, (kind, scheduler_output), output.tensors)
        elif tp_rank == 0 and not stage.is_first:
            channel.send(0, output, tags=RESULT_TAGS)
