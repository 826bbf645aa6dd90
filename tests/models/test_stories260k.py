"""The real trained stories260K (llama2.c format) must reproduce run.c's greedy output byte for byte."""

from __future__ import annotations

from helpers.shared_models import stories_dir
from tokenmill import SamplingParams
from tokenmill.engine.tokenizer import Llama2cTokenizer


def test_greedy_from_bos_matches_run_c_byte_for_byte(make_llm):
    folder = stories_dir()
    llm = make_llm(folder / "stories260K.bin", tokenizer=folder / "tok512.bin")
    # run.c: prompt = BOS alone, 256 steps, temperature 0; it stops early only at BOS (id 1), which
    # stop_token_ids mirrors. EOS (id 2) is not a stop token for run.c, hence ignore_eos.
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, stop_token_ids=[1])
    out = llm.generate({"prompt_token_ids": [1]}, params, use_tqdm=False)[0]
    expected = (folder / "expected_greedy.txt").read_bytes()
    assert len(out.outputs[0].token_ids) == 256
    assert (out.outputs[0].text + "\n").encode("utf-8") == expected  # run.c ends with a newline


def test_once_upon_a_time_encodes_and_continues(make_llm):
    folder = stories_dir()
    tokenizer = Llama2cTokenizer(folder / "tok512.bin")
    assert tokenizer.encode("Once upon a time") == [1, 403, 407, 261, 378]
    llm = make_llm(folder / "stories260K.bin", tokenizer=folder / "tok512.bin")
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 403, 407, 261, 378]
    assert out.outputs[0].text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")


def test_llama2c_tokenizer_round_trips_bytes_and_unicode():
    folder = stories_dir()
    tokenizer = Llama2cTokenizer(folder / "tok512.bin")
    for text in ["Hello world", "naïve café", "emoji 🙂 and 中文", "tabs\tand\nnewlines", ""]:
        ids = tokenizer.encode(text)
        assert ids[0] == 1
        assert tokenizer.decode(ids) == text
