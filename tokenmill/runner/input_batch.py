"""Turns one step's scheduled requests into the packed input tensors of the model and attention.

Requests are ordered decodes first (one new token each), then prompt chunks, and packed without
padding. Example, block_size 4: request A (7 tokens cached in blocks [3, 8], decoding) and
request B (a 3-token prompt chunk, nothing cached, block [5]):

    input_ids    = [a7, b0, b1, b2]
    positions    = [7, 0, 1, 2]
    slot_mapping = [8*4+3, 5*4+0, 5*4+1, 5*4+2]
    logits_index = [0, 3]            # each request's last scheduled token
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.attention.backend import AttentionMetadata, PrefillBatch, PrefillSpan
from tokenmill.sampling_params import SamplingParams
from tokenmill.sample.logits_processors import banned_bad_words, banned_ngram_tokens, build_penalties
from tokenmill.sample.sampler import SamplingMetadata
from tokenmill.scheduler.beam_search import num_beam_candidates


@dataclass
class RunnerRequestState:
    """What the runner keeps per running request between steps."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    attention: AttentionMetadata
    logits_index: torch.Tensor  # (B,) int64
    query_starts: list[int]  # (B,) host copy: each request's first packed token
    request_ids: list[str]  # (B,) in row order
    sampling: SamplingMetadata


def step_seed(seed: int, num_output_tokens: int) -> int:
    """A per-(request, output position) seed, so a request's noise never depends on its history."""
    return (seed * 1_000_003 + num_output_tokens * 7_919 + 1) % (2 ** 63)


def build_step_inputs(states: list[RunnerRequestState], num_scheduled: dict[str, int], block_size: int,
                      device: torch.device, vocab_size: int) -> StepInputs:
    """Packs the scheduled requests (decodes first) into device tensors: the int64 ones are views of one
    tensor, copied to the device at once (prompt chunks' block tables aside)."""
    decodes = [s for s in states if num_scheduled[s.request_id] == 1]
    prefills = [s for s in states if num_scheduled[s.request_id] > 1]
    ordered = decodes + prefills

    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_index: list[int] = []
    spans: list[PrefillSpan] = []
    for state in ordered:
        n = num_scheduled[state.request_id]
        start = state.num_computed_tokens
        query_start = len(input_ids)
        input_ids.extend(state.token_ids[start:start + n])
        positions.extend(range(start, start + n))
        slots.extend(state.block_ids[p // block_size] * block_size + p % block_size for p in range(start, start + n))
        logits_index.append(len(input_ids) - 1)
        if n > 1:
            num_blocks = -(-(start + n) // block_size)
            spans.append(PrefillSpan(query_start, query_start + n, start,
                                      torch.tensor(state.block_ids[:num_blocks], device=device)))

    # Every int64 array of the step in one host tensor and one copy to the device, then views of it:
    # [input_ids (T) | positions (T) | slots (T) | logits_index (B) | decode lens (D) | decode tables (D, W)]
    lens = [s.num_computed_tokens + 1 for s in decodes]
    width = max((len(s.block_ids) for s in decodes), default=0)
    packed = input_ids + positions + slots + logits_index + lens
    for state in decodes:
        packed += state.block_ids
        packed += [0] * (width - len(state.block_ids))
    on_device = torch.tensor(packed, dtype=torch.int64, device=device)
    num_tokens, num_rows = len(input_ids), len(logits_index)
    views = on_device.split([num_tokens, num_tokens, num_tokens, num_rows, len(lens), len(lens) * width])
    decode_tables = decode_lens = decode_mask = None
    max_decode_len = max(lens, default=0)
    if decodes:
        decode_lens, decode_tables = views[4], views[5].view(len(decodes), width)
        if min(lens) < max_decode_len:  # equal lengths (always so at batch 1) need no mask
            decode_mask = (torch.arange(max_decode_len, device=device) < decode_lens[:, None])[:, None, None, :]
    attention = AttentionMetadata(
        slot_mapping=views[2], num_decodes=len(decodes), decode_block_tables=decode_tables, decode_seq_lens=decode_lens,
        max_decode_seq_len=max_decode_len, decode_mask=decode_mask, prefills=tuple(spans),
        prefill_batch=_prefill_batch(prefills, spans, device))
    return StepInputs(
        input_ids=views[0], positions=views[1], attention=attention, logits_index=views[3],
        query_starts=[0] + [i + 1 for i in logits_index[:-1]],
        request_ids=[s.request_id for s in ordered], sampling=build_sampling_metadata(ordered, device, vocab_size))


def _prefill_batch(states: list[RunnerRequestState], spans: list[PrefillSpan],
                   device: torch.device) -> PrefillBatch | None:
    if not spans:
        return None
    tables = [s.block_ids[:len(span.block_table)] for s, span in zip(states, spans)]
    width = max(len(t) for t in tables)
    return PrefillBatch(
        query_start_loc=torch.tensor([span.query_start for span in spans] + [spans[-1].query_end], dtype=torch.int32,
                                     device=device),
        num_computed_tokens=torch.tensor([span.num_computed_tokens for span in spans], dtype=torch.int32,
                                         device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        max_query_len=max(span.query_end - span.query_start for span in spans))


def build_sampling_metadata(states: list[RunnerRequestState], device: torch.device,
                            vocab_size: int) -> SamplingMetadata:
    params = [s.sampling_params for s in states]
    if all(p.greedy for p in params):
        step_seeds = None
    else:
        step_seeds = [step_seed(s.seed, s.num_output_tokens) for s in states]
    use_top_k = any(p.top_k > 0 and not p.greedy for p in params)
    use_top_p = any(p.top_p < 1.0 and not p.greedy for p in params)
    use_min_p = any(p.min_p > 0.0 and not p.greedy for p in params)
    banned_rows: list[int] = []
    banned_cols: list[int] = []
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    bias_values: list[float] = []
    penalty_rows: list[int] = []
    for row, state in enumerate(states):
        p = state.sampling_params
        banned: set[int] = set()
        if state.num_output_tokens < p.min_tokens:
            banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(state.eos_token_ids))
        if p.no_repeat_ngram_size:  # the per-request loops run only for requests that ask for them
            banned |= banned_ngram_tokens(state.token_ids, p.no_repeat_ngram_size)
        if p.bad_words_token_ids:
            banned |= banned_bad_words(state.token_ids, p.bad_words_token_ids)
        banned = {t for t in banned if t < vocab_size}
        banned_rows.extend([row] * len(banned))
        banned_cols.extend(sorted(banned))
        for token, value in p.logit_bias.items():
            if token < vocab_size:
                bias_rows.append(row), bias_cols.append(token), bias_values.append(float(value))
        if p.uses_penalties:
            penalty_rows.append(row)
    logprob_rows = [row for row, state in enumerate(states) if state.sampling_params.logprobs is not None]
    beam_rows = [row for row, state in enumerate(states) if state.sampling_params.use_beam_search]
    beam_counts = [min(num_beam_candidates(states[r].sampling_params, states[r].eos_token_ids), vocab_size)
                   for r in beam_rows]
    penalties = None
    if penalty_rows:
        chosen = [states[r] for r in penalty_rows]
        penalties = build_penalties(
            penalty_rows, [s.token_ids[:s.num_prompt_tokens] for s in chosen],
            [s.token_ids[s.num_prompt_tokens:] for s in chosen], [s.sampling_params.repetition_penalty for s in chosen],
            [s.sampling_params.presence_penalty for s in chosen], [s.sampling_params.frequency_penalty for s in chosen],
            vocab_size, device)
    return SamplingMetadata(
        temperature=None if step_seeds is None else torch.tensor(
            [0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32, device=device),
        top_k=torch.tensor([min(p.top_k, vocab_size) for p in params], device=device) if use_top_k else None,
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device) if use_top_p else None,
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device) if use_min_p else None,
        step_seeds=step_seeds,
        banned_rows=torch.tensor(banned_rows, dtype=torch.long, device=device) if banned_rows else None,
        banned_cols=torch.tensor(banned_cols, dtype=torch.long, device=device) if banned_rows else None,
        penalties=penalties,
        logprob_rows=torch.tensor(logprob_rows, dtype=torch.long, device=device) if logprob_rows else None,
        num_logprobs=max((states[r].sampling_params.logprobs for r in logprob_rows), default=0),
        beam_rows=torch.tensor(beam_rows, dtype=torch.long, device=device) if beam_rows else None,
        beam_num_candidates=beam_counts,
        bias=(torch.tensor(bias_rows, dtype=torch.long, device=device),
              torch.tensor(bias_cols, dtype=torch.long, device=device),
              torch.tensor(bias_values, dtype=torch.float32, device=device)) if bias_rows else None)
