"""Each logits processor against the transformers processor of the same name, on random logits and histories."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.errors import RequestError
from tokenmill.sample.logits_processors import (apply_penalties, banned_bad_words, banned_ngram_tokens,
                                                build_penalties)
from tokenmill.sampling_params import SamplingParams

VOCAB = 40


def _histories(seed: int, rows: int = 4):
    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(rows)]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))] for _ in range(rows)]
    return prompts, outputs


def _logits(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _ban(logits: torch.Tensor, banned: list[set[int]]) -> torch.Tensor:
    out = logits.clone()
    for row, tokens in enumerate(banned):
        out[row, list(tokens)] = float("-inf")
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_repetition_penalty_matches_transformers(penalty, seed):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompts, outputs = _histories(seed, rows=1)
    logits = _logits(seed, rows=1)
    p = build_penalties([0], prompts, outputs, [penalty], [0.0], [0.0], VOCAB, "cpu")
    ours = apply_penalties(logits, p)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompts[0] + outputs[0]]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_follow_openai_formula():
    prompts, outputs = _histories(3)
    logits = _logits(3)
    p = build_penalties([0, 2], [prompts[0], prompts[2]], [outputs[0], outputs[2]], [1.0, 1.0], [0.5, -1.0],
                        [0.25, 1.5], VOCAB, "cpu")
    ours = apply_penalties(logits, p)
    expected = logits.clone()
    for row, presence, frequency in ((0, 0.5, 0.25), (2, -1.0, 1.5)):
        for token in set(outputs[row]):
            expected[row, token] -= presence + frequency * outputs[row].count(token)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_repeat_ngram_matches_transformers(n, seed):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng = random.Random(seed)
    histories = [[rng.randrange(6) for _ in range(rng.randint(1, 20))] for _ in range(1)]  # small vocab: repeats
    logits = _logits(seed, rows=1)
    ours = _ban(logits, [banned_ngram_tokens(h, n) for h in histories])
    theirs = NoRepeatNGramLogitsProcessor(n)(torch.tensor(histories), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_bad_words_match_transformers():
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    bad = [[5], [7, 8], [1, 2, 3]]
    for history in ([4, 7], [1, 2], [9, 9, 9], [3, 1, 2]):
        logits = _logits(len(history), rows=1)
        ours = _ban(logits, [banned_bad_words(history, bad)])
        theirs = NoBadWordsLogitsProcessor(bad, eos_token_id=0)(torch.tensor([history]), logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), history


def test_logit_bias_matches_sequence_bias():
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    from tokenmill.sample.sampler import Sampler, SamplingMetadata

    logits = _logits(7, rows=1)
    bias = {3: 5.0, 11: -2.5}
    md = SamplingMetadata(temperature=torch.tensor([0.0]), top_k=None, top_p=None, min_p=None, step_seeds=None,
                          bias=(torch.tensor([0, 0]), torch.tensor([3, 11]), torch.tensor([5.0, -2.5])))
    theirs = SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(torch.tensor([[1]]), logits.clone())
    assert Sampler()(logits, md).token_ids.item() == int(theirs.argmax())


@pytest.mark.parametrize("kwargs, message", [
    ({"repetition_penalty": 0}, r"repetition_penalty must be >"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2.0, 2.0\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2.0, 2.0\]"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
    ({"logit_bias": {5: 101}}, r"logit_bias\[5\] must be in \[-100.0, 100.0\]"),
    ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids >= 0"),
    ({"bad_words": [""]}, "bad_words must be non-empty strings"),
])
def test_invalid_processor_values(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)
