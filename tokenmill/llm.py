"""LLM: the offline API, with vLLM's conventions.

    from tokenmill import LLM, SamplingParams
    llm = LLM(model="path/to/hf-folder")
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
"""

from __future__ import annotations

from typing import Any, Sequence

from tqdm.auto import tqdm

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.engine.memory import parse_memory
from tokenmill.errors import RequestError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


def engine_config(model: str, tokenizer: str | None = None, dtype: str = "auto",
                  kv_cache_memory: int | float | str | None = None, block_size: int = 16, max_num_seqs: int = 256,
                  max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                  enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                  attention_backend: str = "auto", skip_tokenizer_init: bool = False,
                  device: str = "auto", quantization: str | None = None, quantization_group_size: int | None = None,
                  quantize_lm_head: bool = True, kv_cache_dtype: str = "auto",
                  tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                  pipeline_parallel_size: int = 1, cpu_offload_gb: float = 0.0, offload_folder: str | None = None,
                  max_weight_memory: int | float | str | None = None, offload_prefetch: bool = True,
                  kv_offload_memory: int | float | str | None = None, kv_offload_folder: str | None = None,
                  kv_offload_disk_space: int | float | str = 4 * 2**30, enforce_eager: bool = False,
                  num_scheduler_steps: int = 1) -> EngineConfig:
    """An EngineConfig from the flat options of ``LLM`` (and the CLI); see ``LLM`` for their meaning.
    A known model name (``smollm2-135m-instruct``) becomes its local file, fetched on first use."""
    from tokenmill.models.fetch import resolve_model

    memory = None if kv_cache_memory is None else parse_memory(kv_cache_memory)
    return EngineConfig(
        model=resolve_model(str(model)), tokenizer=None if tokenizer is None else str(tokenizer), dtype=dtype, device=device,
        seed=seed, attention_backend=attention_backend, skip_tokenizer_init=skip_tokenizer_init,
        quantization=quantization, quantization_group_size=quantization_group_size, quantize_lm_head=quantize_lm_head,
        cache=CacheConfig(block_size, memory, enable_prefix_caching, kv_cache_dtype,
                          None if kv_offload_memory is None else parse_memory(kv_offload_memory, "kv_offload_memory"),
                          None if kv_offload_folder is None else str(kv_offload_folder),
                          parse_memory(kv_offload_disk_space, "kv_offload_disk_space")),
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill,
                                  num_scheduler_steps),
        tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel,
        pipeline_parallel_size=pipeline_parallel_size, cpu_offload_gb=cpu_offload_gb,
        offload_folder=None if offload_folder is None else str(offload_folder),
        max_weight_memory=None if max_weight_memory is None else parse_memory(max_weight_memory, "max_weight_memory"),
        offload_prefetch=offload_prefetch, enforce_eager=enforce_eager)


class LLM:
    """Loads a model once and runs batches of prompts through the continuous-batching engine.

    Args:
        model: a Hugging Face folder, a GGUF file, a llama2.c ``.bin`` checkpoint, a known model
            (``smollm2-135m-instruct``, fetched once) or a named random shape.
        tokenizer: tokenizer path when not inside the model folder (llama2.c ``tokenizer.bin``).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        kv_cache_memory: KV cache budget: bytes (int), GiB (float) or a string like ``"2GiB"``.
        block_size: tokens per KV block.
        max_num_seqs, max_num_batched_tokens: per-step limits of requests and tokens.
        max_model_len: longest prompt + output (default: the model's context).
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes.
        enable_chunked_prefill: split long prompts across steps.
        seed: seed for requests that do not give their own.
        attention_backend: ``auto``, ``torch`` (portable PyTorch) or ``cpu`` (C++ decode kernel).
        skip_tokenizer_init: load no tokenizer (prompts as token ids, outputs without text).
        device: ``auto``, ``cpu`` or ``cuda``.
        quantization: ``int8`` or ``int4`` to quantize a float checkpoint's weights at load; GPTQ
            checkpoints are recognised without it.
        quantization_group_size: int4 only: 32, 64 (default), 128 or -1 (per channel).
        quantize_lm_head: quantize the LM head too (int8 under int4).
        kv_cache_dtype: ``auto`` (the model's dtype) or ``int8`` (~2x the tokens in the same memory).
        tensor_parallel_size: processes that each hold 1/N of the model (CPU, gloo); the engine
            starts the workers, and ``shutdown()`` (or the end of this process) stops them.
        enable_expert_parallel: with tensor_parallel_size > 1, place whole experts on the ranks.
        pipeline_parallel_size: processes that each hold a contiguous range of the layers, one batch
            in flight per stage (CPU, gloo); with tensor parallelism, tp x pp processes.
        cpu_offload_gb: CUDA: GiB of weights kept in pinned CPU memory, streamed to the GPU a unit
            (decoder layer, LM head, embedding) at a time; with ``offload_folder``, the pinned part of
            what ``max_weight_memory`` leaves off the GPU (the rest on disk).
        offload_folder, max_weight_memory: any device: weights past the budget (bytes, GiB as a
            float, or a string like ``"32MiB"``) are written to the folder and read back a unit at a time.
        offload_prefetch: move the next offloaded unit while the current one computes.
        kv_offload_memory: a KV tier in CPU memory (pinned on CUDA), this size: prefix-cache blocks
            the device pool evicts wait there and are loaded back on a later prefix hit.
        kv_offload_folder, kv_offload_disk_space: a KV tier on disk (after the memory tier), one
            checksummed file per block, within that many bytes (default 4 GiB).
        enforce_eager: CUDA: no CUDA graphs (each decode step runs the Python forward).
        num_scheduler_steps: CPU: up to this many greedy decode steps per call of the C++ decode step
            while every running request decodes greedily with no sampling, logprobs or processors and
            nothing waits (multi-step scheduling; see ``SchedulerConfig``). Default 1.
    """

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto",
                 kv_cache_memory: int | float | str | None = None, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                 attention_backend: str = "auto", skip_tokenizer_init: bool = False, device: str = "auto",
                 quantization: str | None = None, quantization_group_size: int | None = None,
                 quantize_lm_head: bool = True, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, pipeline_parallel_size: int = 1, cpu_offload_gb: float = 0.0,
                 offload_folder: str | None = None, max_weight_memory: int | float | str | None = None,
                 offload_prefetch: bool = True, kv_offload_memory: int | float | str | None = None,
                 kv_offload_folder: str | None = None, kv_offload_disk_space: int | float | str = 4 * 2**30,
                 enforce_eager: bool = False, num_scheduler_steps: int = 1):
        config = engine_config(model, tokenizer, dtype, kv_cache_memory, block_size, max_num_seqs,
                               max_num_batched_tokens, max_model_len, enable_prefix_caching, enable_chunked_prefill,
                               seed, attention_backend, skip_tokenizer_init, device, quantization,
                               quantization_group_size, quantize_lm_head, kv_cache_dtype, tensor_parallel_size,
                               enable_expert_parallel, pipeline_parallel_size, cpu_offload_gb, offload_folder,
                               max_weight_memory, offload_prefetch, kv_offload_memory, kv_offload_folder,
                               kv_offload_disk_space, enforce_eager, num_scheduler_steps)
        self.engine = LLMEngine(config)

    @classmethod
    def from_engine_config(cls, config: EngineConfig) -> "LLM":
        """An LLM over an EngineConfig built by hand (for options that ``LLM(...)`` does not take)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stops the worker processes of tensor or pipeline parallelism and removes offload files."""
        self.engine.core.shutdown()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt; returns one finished RequestOutput per prompt, in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise RequestError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; "
                                   "give one, or one per prompt")
        request_ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_ids.append(self.engine.add_request(prompt, params))
        except Exception:
            for request_id in request_ids:  # a bad prompt rejects the whole call, leaving nothing queued
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Renders one conversation (or a list of them) with the chat template (``chat_template``, or
        the tokenizer's), then generates."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.engine.encode_chat(conversation, add_generation_prompt, chat_template)
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm or len(request_ids) < 8)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            for request_id in request_ids:
                if request_id not in finished:
                    self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]
