"""The llama2.c encoder in O(n log n) with run.c's exact output, and the cheap token-count bounds
that let an over-long prompt be refused before it is tokenized."""

from __future__ import annotations

import random

import pytest

from helpers.checkpoints import train_tokenizer
from helpers.shared_models import stories_dir
from tokenmill.engine.tokenizer import HFTokenizer, Llama2cTokenizer


def run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """llama2.c's run.c encode, transcribed: rescan every pair after every merge (quadratic)."""
    tokens: list[int] = []
    if text:
        text = " " + text
    for char in text:
        piece = char.encode("utf-8")
        if piece in tok.lookup:
            tokens.append(tok.lookup[piece])
        else:
            tokens.extend(b + 3 for b in piece)
    while True:
        best_score, best_index, best_id = float("-inf"), -1, -1
        for i in range(len(tokens) - 1):
            merged = tok.lookup.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if merged is not None and tok.scores[merged] > best_score:
                best_score, best_index, best_id = tok.scores[merged], i, merged
        if best_index < 0:
            break
        tokens[best_index:best_index + 2] = [best_id]
    return [1] + tokens


def _random_texts(count: int, max_len: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz     ,.!?'\n\tTOLé文🙂") + ["the ", "and ", "Lily ", "Once upon a time "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(count)]


@pytest.fixture(scope="module")
def stories_tokenizer() -> Llama2cTokenizer:
    return Llama2cTokenizer(stories_dir() / "tok512.bin")


def test_heap_merges_give_run_c_tokens(stories_tokenizer):
    texts = _random_texts(300, 120) + ["Once upon a time " * 100, "aaaa" * 200, " " * 64, "the the the", ""]
    for text in texts:
        assert stories_tokenizer.encode(text) == run_c_encode(stories_tokenizer, text), text


class _CountingDict(dict):
    lookups = 0

    def get(self, key, default=None):
        _CountingDict.lookups += 1
        return super().get(key, default)


def test_encoding_does_linear_many_pair_lookups(stories_tokenizer):
    """The quadratic loop looked up every pair after every merge: for 8,500 characters that is
    millions of lookups (seconds here; 16k characters took 10 s, 1 MB over 8 minutes). The heap
    looks up each pair once when it forms: a few per character."""
    text = "Once upon a time " * 500
    tok = Llama2cTokenizer(stories_dir() / "tok512.bin")
    tok.lookup = _CountingDict(tok.lookup)
    _CountingDict.lookups = 0
    ids = tok.encode(text)
    assert ids == stories_tokenizer.encode(text)
    assert _CountingDict.lookups < 3 * len(text), _CountingDict.lookups


def test_token_count_bounds_never_exceed_the_real_count(stories_tokenizer, tmp_path):
    hf = tmp_path / "hf"
    train_tokenizer(hf)
    hf_tokenizer = HFTokenizer(hf)
    texts = _random_texts(200, 400, seed=1) + ["x" * 5000, "🙂" * 300, "Once upon a time " * 300]
    for text in texts:
        assert stories_tokenizer.min_num_tokens(text) <= len(stories_tokenizer.encode(text, add_special_tokens=False))
        assert hf_tokenizer.min_num_tokens(text) <= len(hf_tokenizer.encode(text, add_special_tokens=False))
    # And they are tight enough to refuse a long prompt: the llama2.c pieces are at most 7 bytes.
    assert stories_tokenizer.min_num_tokens("a" * 7000) == 1001
    assert hf_tokenizer.min_num_tokens("a" * 7000) >= 7000 // max(len(t) for t in hf_tokenizer._tok.get_vocab())


def test_hf_encoding_lets_other_threads_run(tmp_path):
    """The server tokenizes in worker threads; that only frees its event loop if the tokenizer lets
    go of the GIL. `Tokenizer.encode` holds it for the whole call (seconds for megabytes)."""
    import threading
    import time

    train_tokenizer(tmp_path)
    tokenizer = HFTokenizer(tmp_path)
    text = "Once upon a time there was a little robot. " * 50_000  # 2.2 MB
    done = threading.Event()
    worker = threading.Thread(target=lambda: (tokenizer.encode(text), done.set()))
    slowest, last = 0.0, time.monotonic()
    worker.start()
    while not done.is_set():
        time.sleep(0.002)
        now = time.monotonic()
        slowest, last = max(slowest, now - last), now
    worker.join()
    assert slowest < 0.3, f"the main thread was held for {slowest:.2f} s"
