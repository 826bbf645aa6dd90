"""Streaming detokenisation with the real Llama 2 SentencePiece tokenizer (byte-fallback pieces)."""

from __future__ import annotations

import pytest

from helpers.shared_models import SHARED_MODELS
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.tokenizer import HFTokenizer
from tokenmill.sampling_params import SamplingParams

TEXTS = [
    "Hello 🙂 world! 你好，世界。 Ünïcödé 🎉🎉 done",
    "日本語のテキストと絵文字👩‍👩‍👧‍👦も",
    "plain ascii then 😀😃😄 then 한국어",
]


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    model = SHARED_MODELS / "llama2-tokenizer" / "tokenizer.model"
    if not model.is_file():
        pytest.skip(f"the Llama 2 tokenizer is not at {model} (../shared/models is absent)")
    import shutil

    # Test-side conversion of tokenizer.model to tokenizer.json, which is what tokenmill reads.
    from transformers import LlamaTokenizer

    source = tmp_path_factory.mktemp("llama2-spm")
    shutil.copy(model, source / "tokenizer.model")
    folder = tmp_path_factory.mktemp("llama2-tok")
    converted = LlamaTokenizer.from_pretrained(source)
    assert len(converted) == 32000
    converted.save_pretrained(folder)
    tokenizer = HFTokenizer(folder)
    assert tokenizer.vocab_size == 32000
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(llama2_tokenizer, text):
    ids = llama2_tokenizer.encode(text, add_special_tokens=False)
    byte_pieces = [i for i in ids if 3 <= i <= 258]
    assert byte_pieces, "the text should need byte-fallback pieces"
    prompt = llama2_tokenizer.encode("Say:")
    detok = IncrementalDetokenizer(llama2_tokenizer, prompt, SamplingParams())
    deltas = [detok.update([t], finished=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    assert all("\ufffd" not in d for d in deltas)
    # The reference: decode prompt + output in one go and take what follows the prompt's text.
    full = llama2_tokenizer.decode(prompt + ids)
    assert "".join(deltas) == full[len(llama2_tokenizer.decode(prompt)):]
    assert "".join(deltas) == " " + text  # the dummy-prefix space of "▁Hello" belongs to the continuation


def test_stop_string_spanning_tokens_never_leaks(llama2_tokenizer):
    text = "first line 你好 STOP here and more"
    ids = llama2_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(llama2_tokenizer, [1], SamplingParams(stop=["好 STOP"]))
    streamed = ""
    for t in ids:
        streamed += detok.update([t], finished=False)
        assert "STOP" not in streamed and "好 S" not in streamed
        if detok.stop_string:
            break
    assert detok.stop_string == "好 STOP"
    assert streamed == "first line 你"
