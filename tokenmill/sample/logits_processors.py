"""Logits processors, batched: penalties, n-gram bans, bad words, logit bias.

Only rows whose requests use a processor pay for it: ``build_processor_inputs`` returns None
when no row needs one. Penalties and bias are tensor operations over those rows; n-gram bans and
multi-token bad words need each request's own history, so they are a loop over just the rows
that ask for them, producing (row, token) pairs to mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PenaltyInputs:
    rows: torch.Tensor
    """(R,) int64 rows that use a penalty."""
    prompt_mask: torch.Tensor
    """(R, V) bool: the token occurs in the prompt."""
    output_counts: torch.Tensor
    """(R, V) float32: how often the token occurs in the output so far."""
    repetition: torch.Tensor  # (R,) Hugging Face repetition_penalty (1 = off)
    presence: torch.Tensor  # (R,) OpenAI presence_penalty (0 = off)
    frequency: torch.Tensor  # (R,) OpenAI frequency_penalty (0 = off)


def _token_presence(histories: Sequence[Sequence[int]], vocab_size: int, device, counts: bool) -> torch.Tensor:
    """(R, V) counts (float32) or presence (bool) of each row's tokens; padding goes to a dropped column."""
    width = max((len(h) for h in histories), default=0)
    ids = torch.full((len(histories), max(width, 1)), vocab_size, dtype=torch.long)
    for row, history in enumerate(histories):
        if history:
            ids[row, :len(history)] = torch.tensor(history)
    ids = ids.to(device)
    out = torch.zeros(len(histories), vocab_size + 1, device=device)
    out.scatter_add_(1, ids, torch.ones_like(ids, dtype=out.dtype))
    out = out[:, :vocab_size]
    return out if counts else out > 0


def build_penalties(rows: list[int], prompts: list[Sequence[int]], outputs: list[Sequence[int]],
                    repetition: list[float], presence: list[float], frequency: list[float], vocab_size: int,
                    device) -> PenaltyInputs:
    return PenaltyInputs(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        prompt_mask=_token_presence(prompts, vocab_size, device, counts=False),
        output_counts=_token_presence(outputs, vocab_size, device, counts=True),
        repetition=torch.tensor(repetition, dtype=torch.float32, device=device),
        presence=torch.tensor(presence, dtype=torch.float32, device=device),
        frequency=torch.tensor(frequency, dtype=torch.float32, device=device))


def apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    """logits (B, V) float32, modified rows returned in a new tensor.

    repetition_penalty (Hugging Face): a token seen in the prompt or output has its logit divided
    by the penalty if positive, multiplied if negative. presence/frequency (OpenAI): subtract
    ``presence * [count > 0] + frequency * count`` over the output tokens.
    """
    sub = logits[p.rows]
    seen = p.prompt_mask | (p.output_counts > 0)
    rep = p.repetition.unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - p.frequency.unsqueeze(1) * p.output_counts - p.presence.unsqueeze(1) * (p.output_counts > 0)
    out = logits.clone()
    out[p.rows] = sub
    return out


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``tokens`` (prompt + output), as Hugging Face bans them."""
    if n <= 0 or len(tokens) + 1 < n:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    banned = set()
    for start in range(len(tokens) - n + 1):
        if tuple(tokens[start:start + n - 1]) == prefix:
            banned.add(tokens[start + n - 1])
    return banned


def banned_bad_words(tokens: Sequence[int], bad_words_ids: Sequence[Sequence[int]]) -> set[int]:
    """Last tokens of bad-word sequences whose other tokens end ``tokens`` (single tokens: always)."""
    banned = set()
    for word in bad_words_ids:
        if len(word) == 1 or (len(tokens) >= len(word) - 1 and list(tokens[len(tokens) - len(word) + 1:]) == list(word[:-1])):
            banned.add(word[-1])
    return banned
