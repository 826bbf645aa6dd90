"""EngineCore: token-level continuous batching. ``step()`` = schedule -> execute -> update."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, replace

import torch
from torch import nn

from tokenmill.attention.registry import create_backend
from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.distributed.parallel_state import WHOLE_MODEL
from tokenmill.engine.memory import default_kv_cache_memory, kv_bytes_per_token
from tokenmill.errors import RequestError
from tokenmill.logger import get_logger
from tokenmill.offload.block_store import KVTierStats
from tokenmill.offload.kv_tiers import build_block_store
from tokenmill.outputs import EngineCoreOutput, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.runner.cuda_graphs import GraphLimits
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.kv_cache_manager import KVCacheManager
from tokenmill.scheduler.scheduler import Scheduler

logger = get_logger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against; a front end in another process gets a copy."""

    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int


def validate_request(prompt_token_ids: list[int], params: SamplingParams, limits: EngineLimits) -> int:
    """Raises RequestError if the request can never be served; returns its max_tokens (capped by the context)."""
    if not prompt_token_ids:
        raise RequestError("the prompt is empty: give at least one token")
    vocab = limits.vocab_size
    bad = [t for t in prompt_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
    for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids),
                      ("bad_words_token_ids", [t for word in params.bad_words_token_ids for t in word])):
        outside = sorted(t for t in ids if t >= vocab)
        if outside:  # such a token can never be produced: a bias or stop on it would silently do nothing
            raise RequestError(f"{name} has token id {outside[0]}, outside the vocabulary [0, {vocab})")
    num_prompt, max_len = len(prompt_token_ids), limits.max_model_len
    if num_prompt >= max_len:
        raise RequestError(f"prompt has {num_prompt} tokens; max_model_len is {max_len}, which "
                           f"leaves no room for output (at most {max_len - 1} prompt tokens)")
    if params.max_tokens is not None and num_prompt + params.max_tokens > max_len:
        raise RequestError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                           f"{num_prompt + params.max_tokens} exceeds max_model_len {max_len}")
    max_tokens = params.max_tokens or max_len - num_prompt
    # Beams may all have to be recomputed side by side after a preemption: budget for no sharing.
    num_blocks_needed = params.beam_width * -(-(num_prompt + max_tokens) // limits.block_size)
    if num_blocks_needed > limits.num_blocks:
        raise RequestError(f"request needs up to {num_blocks_needed} KV blocks"
                           f"{f' ({params.beam_width} beams)' if params.use_beam_search else ''} but the cache "
                           f"has {limits.num_blocks}; raise kv_cache_memory or lower max_tokens")
    if params.beam_width > limits.max_num_seqs:
        raise RequestError(f"beam_width {params.beam_width} exceeds max_num_seqs {limits.max_num_seqs}: "
                           "every beam is a sequence in the batch")
    return max_tokens


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the core for metrics; cumulative counts since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    kv_tiers: tuple[KVTierStats, ...] = ()
    """Each KV offload tier's contents and counts (none without offloading)."""


class EngineCore:
    """Owns the scheduler, the KV cache and the model runner; knows nothing of text."""

    def __init__(self, config: EngineConfig, model: nn.Module, model_config: ModelConfig,
                 eos_token_ids: tuple[int, ...], device: torch.device, executor=None):
        """``executor``: the worker ranks (``build_engine_core`` starts them), None in one process."""
        self.config = config
        self.model_config = model_config
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = self._resolve_max_model_len(config, model_config)
        dtype = next(model.parameters()).dtype
        block_size = config.cache.block_size
        kv_cache_dtype = config.cache.kv_cache_dtype
        num_kv_heads = model.attention_layers()[0].num_kv_heads  # this rank's
        stage = getattr(model, "stage", WHOLE_MODEL)
        num_layers = stage.max_layers(model_config.num_hidden_layers)  # every stage's cache holds num_blocks
        bytes_per_block = kv_bytes_per_token(model_config, dtype, kv_cache_dtype, num_kv_heads,
                                             num_layers) * block_size
        max_num_seqs = config.scheduler.max_num_seqs
        usable = max_num_seqs * -(-self.max_model_len // block_size) * bytes_per_block
        budget = config.cache.kv_cache_memory or default_kv_cache_memory(device, usable)
        if config.cache.kv_cache_memory is None:
            logger.info("KV cache sized by default to %.1f MiB: room for max_num_seqs %d x max_model_len %d tokens "
                        "where memory allows (set kv_cache_memory / --kv-cache-memory to change)",
                        budget / 2**20, max_num_seqs, self.max_model_len)
        self.num_blocks = budget // bytes_per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory {budget} bytes holds no block of {block_size} tokens "
                             f"({bytes_per_block} bytes each); give at least {bytes_per_block}")
        stored = str(dtype).removeprefix("torch.")
        if kv_cache_dtype != "auto":
            ratio = kv_bytes_per_token(model_config, torch.float16) / kv_bytes_per_token(model_config, dtype,
                                                                                         kv_cache_dtype)
            kind = ("int8 with a float16 scale per token and head" if kv_cache_dtype == "int8"
                    else "float8 e4m3 with a per-tensor scale")
            stored = f"{kind}: {ratio:.2f}x the tokens of a 16-bit cache"
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %d layers x %d KV heads x %d%s)",
                    self.num_blocks, block_size, self.num_blocks * block_size,
                    self.num_blocks * bytes_per_block / 2**20, stored, num_layers, num_kv_heads,
                    model_config.head_dim, " on each rank" if executor is not None else "")
        backend = create_backend(config.attention_backend, device)
        logger.info("attention backend: %s", backend.name)
        one_process = config.tensor_parallel_size * config.pipeline_parallel_size == 1
        graphs = (GraphLimits(config.scheduler.max_num_seqs, self.max_model_len, block_size)
                  if one_process and not config.enforce_eager else None)
        self.runner = ModelRunner(model, backend, self.num_blocks, block_size, dtype, device,
                                  list(eos_token_ids), kv_cache_dtype, graphs)
        self.executor = executor
        if executor is not None:
            self.runner = executor.runner(self.runner, self.num_blocks, dtype, list(eos_token_ids))
        cache = config.cache
        self.block_store = None
        if cache.has_kv_offload:
            self.block_store = build_block_store(cache.kv_offload_memory, cache.kv_offload_folder,
                                                 cache.kv_offload_disk_space, self.runner.kv_transfer.bytes_per_block,
                                                 device)
            self.runner.attach_block_store(self.block_store)
        self.kv_cache_manager = KVCacheManager(self.num_blocks, block_size, cache.enable_prefix_caching,
                                               self.block_store)
        num_steps = config.scheduler.num_scheduler_steps
        if num_steps > 1 and not (executor is None and self.runner.runs_steps):
            logger.info("num_scheduler_steps %d: one decode step per call here (only the C++ CPU decode step, in "
                        "one process and with the LM head in it, runs several)", num_steps)
            num_steps = 1
        elif num_steps > 1:
            logger.info("multi-step scheduling: up to %d greedy decode steps per call of the C++ decode step",
                        num_steps)
        scheduler_config = replace(config.scheduler, max_model_len=self.max_model_len, num_scheduler_steps=num_steps)
        self.max_concurrent_batches = getattr(self.runner, "max_concurrent_batches", 1)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache_manager, self.max_concurrent_batches)
        self._in_flight: deque[tuple[SchedulerOutput, object]] = deque()  # (step, its PendingResult)
        self.max_batches_in_flight = 0  # the most seen at once (the pipeline overlap, for tests and benchmarks)
        self._seeds = itertools.count()

    @staticmethod
    def _resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
        limit = model_config.max_position_embeddings
        if model_config.sliding_window:  # the portable backend attends to the full context: stay inside the window
            limit = min(limit, model_config.sliding_window)
        asked = config.scheduler.max_model_len
        if asked is None:
            return limit
        if asked > limit:
            raise ValueError(f"max_model_len {asked} exceeds the model's context length {limit}")
        return asked

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(self.max_model_len, self.model_config.vocab_size, self.num_blocks,
                            self.config.cache.block_size, self.config.scheduler.max_num_seqs)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Validates and queues a request; RequestError if it cannot ever be served."""
        max_tokens = validate_request(prompt_token_ids, params, self.limits)
        seed = params.seed if params.seed is not None else hash((self.config.seed, next(self._seeds))) % 2**31
        beam_search = params.use_beam_search
        request = Request(request_id=f"{request_id}#beam0" if beam_search else request_id,
                          prompt_token_ids=list(prompt_token_ids), sampling_params=params,
                          eos_token_ids=self.eos_token_ids, max_tokens=max_tokens, seed=seed)
        self.scheduler.add_request(request, group_id=request_id if beam_search else None)
        return request

    def abort_requests(self, request_ids) -> None:
        """Ends requests (a beam-search request by its own id, with all its beams) and frees their blocks."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids) -> None:
        """Ends requests that a stop string finished (found by the detokenizer)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def step(self) -> list[EngineCoreOutput]:
        """Schedules a batch, runs it and returns what it produced. Under pipeline parallelism up to one batch
        per stage is in flight: a call that could start another returns [] at once, and a call with the
        pipeline full (or nothing new to start) waits for the oldest batch and returns its outputs."""
        if self.max_concurrent_batches == 1:
            scheduler_output = self.scheduler.schedule()
            runner_output = self.runner.execute(scheduler_output)
            return self.scheduler.update_from_output(scheduler_output, runner_output)
        if len(self._in_flight) < self.max_concurrent_batches:
            scheduler_output = self.scheduler.schedule()
            if (scheduler_output.num_scheduled_tokens or scheduler_output.finished_req_ids
                    or scheduler_output.block_copies):
                self._in_flight.append((scheduler_output, self.runner.execute_async(scheduler_output)))
                self.max_batches_in_flight = max(self.max_batches_in_flight, len(self._in_flight))
                if scheduler_output.num_scheduled_tokens and len(self._in_flight) < self.max_concurrent_batches:
                    return []  # room for one more batch before waiting on this one
        if not self._in_flight:
            return []
        scheduler_output, pending = self._in_flight.popleft()
        outputs = self.scheduler.update_from_output(scheduler_output, pending.result())
        while self._in_flight and self.scheduler.num_unfinished == 0:  # the rest hold no live request: collect
            scheduler_output, pending = self._in_flight.popleft()  # them now rather than at the next request
            outputs += self.scheduler.update_from_output(scheduler_output, pending.result())
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or batches whose results have not come back."""
        return self.scheduler.num_unfinished > 0 or bool(self._in_flight)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def stats(self) -> EngineStats:
        kv = self.kv_cache_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), kv.usage, kv.num_free_blocks,
                           kv.num_queried_tokens, kv.num_hit_tokens, self.scheduler.num_preemptions,
                           self.block_store.stats() if self.block_store is not None else ())

    def all_blocks_free(self) -> bool:
        return self.kv_cache_manager.num_free_blocks == self.num_blocks

    def shutdown(self) -> None:
        """Stops the worker ranks, if any, and removes offloaded weights' and KV blocks' files."""
        if self.executor is not None:
            self.executor.shutdown()
        streamer = getattr(self.runner.model, "weight_streamer", None)
        if streamer is not None:
            streamer.close()
        if self.block_store is not None:
            self.block_store.close()


def load_engine_model(config: EngineConfig, device: torch.device):
    """(model, model_config, executor): the model, over several processes (``tensor_parallel_size`` or
    ``pipeline_parallel_size`` > 1) rank 0's part after starting the worker ranks (each loads its own;
    ``executor`` drives them, None in one process)."""
    from tokenmill.distributed.parallel_state import SINGLE, building_for
    from tokenmill.engine.model_loading import load_for_engine

    executor = None
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        from tokenmill.distributed.executor import DistributedExecutor

        executor = DistributedExecutor(config)
    try:
        with building_for(executor.group, executor.stage) if executor else building_for(SINGLE):
            model, model_config = load_for_engine(config, device)
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise
    return model, model_config, executor


def build_engine_core(config: EngineConfig, device: torch.device, model_and_executor=None,
                      tokenizer_eos: tuple[int, ...] = ()) -> EngineCore:
    """The core over ``load_engine_model``'s result (loaded here when not given); stops the workers if
    the core cannot be built."""
    model, model_config, executor = model_and_executor or load_engine_model(config, device)
    try:
        eos = tuple(dict.fromkeys(tuple(model_config.eos_token_ids) + tuple(tokenizer_eos)))
        return EngineCore(config, model, model_config, eos, device, executor)
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise
