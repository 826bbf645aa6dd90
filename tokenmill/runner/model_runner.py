"""ModelRunner: SchedulerOutput -> input tensors -> model -> logits -> Sampler -> ModelRunnerOutput."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.kv_quant import QuantizedKVCache, make_kv_cache
from tokenmill.attention.layer import forward_context
from tokenmill.distributed.parallel_state import WHOLE_MODEL
from tokenmill.models.pipeline import StageTensors
from tokenmill.outputs import ModelRunnerOutput, SchedulerOutput
from tokenmill.runner.cpu_decode_step import CpuDecodeStep
from tokenmill.runner.cuda_graphs import CudaGraphDecodeStep, GraphLimits
from tokenmill.runner.input_batch import RunnerRequestState, build_step_inputs
from tokenmill.runner.kv_transfer import KVBlockTransfer
from tokenmill.runner.profiling import phase
from tokenmill.sample.sampler import Sampler, SamplerOutput


class ModelRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, device: torch.device, eos_token_ids: list[int], kv_cache_dtype: str = "auto",
                 graphs: GraphLimits | None = None):
        """``graphs``: the batch and context bounds for CUDA graphs of decode steps (None: none)."""
        self.model = model
        self.stage = getattr(model, "stage", WHOLE_MODEL)
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.sampler = Sampler()
        self.requests: dict[str, RunnerRequestState] = {}
        cfg = model.config
        num_kv_heads = model.attention_layers()[0].num_kv_heads  # this rank's (all of them in one process)
        shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, cfg.head_dim)
        self.kv_caches = []
        for layer in model.attention_layers():  # a float (2, blocks, block_size, nkv, d) tensor, or quantized
            cache = make_kv_cache(kv_cache_dtype, shape, kv_dtype, device)
            layer.bind_kv_cache(backend, cache)
            self.kv_caches.append(cache)
        # Decode-only steps in one call: the C++ step on CPU, CUDA graphs on a GPU (None: the Python forward).
        self.decode_step = (CpuDecodeStep.build(model, backend.name, self.kv_caches)
                            or CudaGraphDecodeStep.build(model, backend.name, graphs, device))
        self.kv_transfer = KVBlockTransfer(self.kv_caches, device)
        self.block_store = None  # the KV tiers, once attached

    @property
    def runs_steps(self) -> bool:
        """Whether this runner can run several greedy decode steps in one call (``SchedulerOutput.num_steps``)."""
        return getattr(self.decode_step, "runs_steps", False)  # the C++ step's, with the LM head in it

    def attach_block_store(self, store) -> None:
        """Saves evicted blocks to ``store`` (a TieredBlockStore) from now on, as SchedulerOutputs ask."""
        self.block_store = store

    def _update_states(self, so: SchedulerOutput) -> None:
        for request_id in so.finished_req_ids:
            self.requests.pop(request_id, None)
        for new in so.scheduled_new_reqs:
            self.requests[new.request_id] = RunnerRequestState(
                request_id=new.request_id, token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
                sampling_params=new.sampling_params, seed=new.seed, block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, eos_token_ids=self.eos_token_ids)
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.request_id]
            state.token_ids.extend(cached.new_token_ids)
            if cached.block_ids is not None:
                state.block_ids = list(cached.block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        if so.kv_saves or so.kv_loads:  # before the copies: a copy's destination may be a block just evicted
            self.kv_transfer.apply(so.kv_saves, so.kv_loads, self.block_store)
        if so.block_copies:
            self._copy_blocks(so.block_copies)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst takes block src's K and V in every layer."""
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:  # (2, blocks, block_size, nkv, d)
            if isinstance(cache, QuantizedKVCache):
                cache.copy_blocks(src, dst)
            else:
                cache[:, dst] = cache[:, src]

    def _run_model(self, so: SchedulerOutput, received: StageTensors | None):
        """(inputs, hidden (T, H), logits (T, V) or None, greedy tokens (T,) or None), or this stage's
        StageTensors for the next stage of a pipeline. Logits come only from a decode step (C++ or CUDA
        graphs: each of its rows is a request's last token), greedy tokens only from the C++ one."""
        inputs = self._step_inputs(so)
        if self.decode_step is not None and not inputs.attention.prefills:
            with phase("tokenmill.decode_step"):
                stepped = self.decode_step(inputs.input_ids, inputs.positions, inputs.attention)
            if stepped is not None:  # None: outside what the graphs hold
                return inputs, *stepped  # (T, H), (T, V), (T,) or None
        with forward_context(inputs.attention), phase("tokenmill.forward"):
            hidden = self.model(inputs.input_ids, inputs.positions, received)  # (T, H)
        return inputs, hidden, None, None

    def _step_inputs(self, so: SchedulerOutput):
        """Applies the step's request updates (and KV moves), then packs its inputs (``StepInputs``)."""
        self._update_states(so)
        states = [self.requests[request_id] for request_id in so.num_scheduled_tokens]
        with phase("tokenmill.step_inputs"):
            return build_step_inputs(states, so.num_scheduled_tokens, self.block_size, self.device,
                                     self.model.config.vocab_size)

    def _forward(self, so: SchedulerOutput, all_positions: bool = False, received: StageTensors | None = None):
        """(inputs, logits (T or B, V), hidden (T, H), greedy tokens (B,) from the decode step or None)."""
        inputs, hidden, logits, greedy_tokens = self._run_model(so, received)
        if logits is None:  # a step of decodes only needs no gather: each token is its request's last
            last_only = not all_positions and inputs.attention.num_decodes < hidden.shape[0]
            logits = self.model.compute_logits(hidden[inputs.logits_index] if last_only else hidden)
        return inputs, (logits.float() if all_positions else logits), hidden, greedy_tokens  # the sampler casts

    def _stage_forward(self, so: SchedulerOutput, received: StageTensors | None) -> StageTensors:
        """A stage before the last: its layers' output for the next stage (nothing for an empty step)."""
        if so.is_empty:
            self._update_states(so)
            return StageTensors({})
        return self._run_model(so, received)[1]

    def _prompt_logprobs(self, inputs, hidden: torch.Tensor) -> dict[str, tuple[int, list[tuple[list[int], list[float]]]]]:
        """For requests with prompt_logprobs: (first prompt position, entries) of this step's prompt tokens.

        Position q's logits predict prompt token q + 1; the entry holds that token's logprob first,
        then the top alternatives.
        """
        out = {}
        for row, request_id in enumerate(inputs.request_ids):
            state = self.requests[request_id]
            k = state.sampling_params.prompt_logprobs
            if k is None:
                continue
            first = state.num_computed_tokens  # the position of this step's first token
            start = inputs.query_starts[row]  # its index in the packed batch
            num_scheduled = int(inputs.logits_index[row]) - start + 1
            # Positions first .. first + m - 1 predict prompt tokens first + 1 .. first + m.
            m = min(first + num_scheduled, state.num_prompt_tokens - 1) - first
            if m <= 0:
                continue
            logprobs = self.model.compute_logits(hidden[start:start + m]).float().log_softmax(-1)  # (m, V)
            targets = torch.tensor(state.token_ids[first + 1:first + 1 + m], device=logprobs.device)
            ids = targets.unsqueeze(1)
            if k:
                ids = torch.cat([ids, logprobs.topk(k, dim=-1).indices], 1)
            out[request_id] = (first + 1, list(zip(ids.tolist(), logprobs.gather(1, ids).tolist())))
        return out

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput, sample: bool = True,
                received: StageTensors | None = None) -> ModelRunnerOutput | StageTensors:
        """Runs one step and samples one token per request whose scheduled tokens end its sequence.
        ``sample=False`` (a tensor-parallel worker): the same forward passes and collectives, no sampling.
        One stage of a pipeline starts from ``received`` (the previous stage's output; None on the first)
        and, before the last stage, returns its own output for the next."""
        if not self.stage.is_last:
            return self._stage_forward(so, received)
        if so.is_empty:
            self._update_states(so)
            return ModelRunnerOutput({})
        if so.num_steps > 1:
            return self._execute_steps(so)
        inputs, logits, hidden, greedy_tokens = self._forward(so, received=received)
        if not sample:
            if any(self.requests[rid].sampling_params.prompt_logprobs is not None for rid in inputs.request_ids):
                self._prompt_logprobs(inputs, hidden)
            return ModelRunnerOutput({})
        if greedy_tokens is not None and inputs.sampling.plain_greedy:  # the decode step's argmax is the sample
            sampled = SamplerOutput(greedy_tokens)
        else:
            with phase("tokenmill.sample"):
                sampled = self.sampler(logits, inputs.sampling)
        token_ids = sampled.token_ids.tolist()  # the step's one host sync
        logprobs = {}
        if sampled.logprob_token_ids is not None:  # a second sync, only for steps with logprob requests
            rows = inputs.sampling.logprob_rows.tolist()
            for row, ids, values in zip(rows, sampled.logprob_token_ids.tolist(), sampled.logprobs.tolist()):
                state = self.requests[inputs.request_ids[row]]
                keep = 1 + state.sampling_params.logprobs
                logprobs[inputs.request_ids[row]] = [(ids[:keep], values[:keep])]
        beam_candidates = {}
        if sampled.beam_token_ids is not None:  # one more sync, only for steps with beam-search requests
            md = inputs.sampling
            for row, keep, ids, values in zip(md.beam_rows.tolist(), md.beam_num_candidates,
                                              sampled.beam_token_ids.tolist(), sampled.beam_logprobs.tolist()):
                beam_candidates[inputs.request_ids[row]] = (ids[:keep], values[:keep])
        prompt_logprobs = {}
        if any(self.requests[rid].sampling_params.prompt_logprobs is not None for rid in inputs.request_ids):
            prompt_logprobs = self._prompt_logprobs(inputs, hidden)
        return ModelRunnerOutput({rid: [tok] for rid, tok in zip(inputs.request_ids, token_ids)}, logprobs,
                                 prompt_logprobs, beam_candidates)

    def _execute_steps(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """``so.num_steps`` greedy decode steps in one call of the C++ step: each request's tokens, one a step."""
        inputs = self._step_inputs(so)
        if not (self.runs_steps and not inputs.attention.prefills and inputs.sampling.plain_greedy):
            raise RuntimeError(f"a {so.num_steps}-step decode was scheduled for a batch that needs the host between "
                               "tokens (prompt chunks, sampling, processors or logprobs) or a runner without the C++ "
                               "decode step's greedy loop")
        with phase("tokenmill.decode_steps"):
            tokens = self.decode_step.steps(inputs.input_ids, inputs.positions, inputs.attention, so.num_steps)
        by_row = tokens.t().tolist()  # (M, num_steps): the step's one host sync
        return ModelRunnerOutput(dict(zip(inputs.request_ids, by_row)))

    @torch.inference_mode()
    def execute_logits(self, so: SchedulerOutput,
                       received: StageTensors | None = None) -> dict[str, torch.Tensor] | StageTensors:
        """Runs one step without sampling: each request's logits (n_scheduled, V) at every new position
        (before the last stage of a pipeline: this stage's output, as ``execute``)."""
        if not self.stage.is_last:
            return self._stage_forward(so, received)
        inputs, logits, _, _ = self._forward(so, all_positions=True, received=received)
        starts = [0] + [int(i) + 1 for i in inputs.logits_index[:-1]]
        ends = [int(i) + 1 for i in inputs.logits_index]
        return {rid: logits[s:e] for rid, s, e in zip(inputs.request_ids, starts, ends)}
