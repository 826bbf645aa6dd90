"""Incremental detokenisation with a byte-level BPE tokenizer (multi-byte characters span tokens)."""

from __future__ import annotations

import pytest

from helpers.checkpoints import train_tokenizer
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import HFTokenizer
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(folder)
    return HFTokenizer(folder)


def _stream(tokenizer, text, params, prompt="Say: "):
    prompt_ids = tokenizer.encode(prompt)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(detok.update([t], finished=i == len(ids) - 1))
        if detok.stop_string:
            break
    return deltas, detok


def test_multibyte_characters_never_emit_replacement(tokenizer):
    text = "emoji 🙂🎉 and 中文 and ünïcode"
    deltas, _ = _stream(tokenizer, text, SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_split_across_tokens_is_cut_and_held_back(tokenizer):
    deltas, detok = _stream(tokenizer, "the quick brown fox jumps", SamplingParams(stop=["brown f"]))
    assert detok.stop_string == "brown f"
    assert "".join(deltas) == "the quick "
    assert not any("brown" in d for d in deltas)


def test_a_burst_of_tokens_is_read_up_to_the_stop_string(tokenizer):
    """Several tokens at once (a multi-step burst): reading stops at the token completing the stop string,
    and ``num_tokens_taken`` says how many were read, so the caller drops the rest."""
    ids = tokenizer.encode("the quick brown fox jumps over", add_special_tokens=False)
    one = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say: "), SamplingParams(stop=["brown f"]))
    for taken, token in enumerate(ids, 1):
        one.update([token], finished=False)
        if one.stop_string:
            break
    assert taken < len(ids)
    burst = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say: "), SamplingParams(stop=["brown f"]))
    delta = burst.update(ids, finished=False)
    assert burst.stop_string == "brown f" and burst.num_tokens_taken == taken and delta == "the quick "
    plain = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    plain.update(ids, finished=False)
    assert plain.num_tokens_taken == len(ids)


def test_earliest_stop_string_wins(tokenizer):
    _, detok = _stream(tokenizer, "alpha beta gamma", SamplingParams(stop=["gamma", "beta"]))
    assert detok.stop_string == "beta" and detok.text == "alpha "


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("hi") + [2]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>hi</s>"
    assert tokenizer.eos_token_ids == (2,) and tokenizer.bos_token_id == 1
