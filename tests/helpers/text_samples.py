"""Text samples for tokenizer comparisons: ASCII, accents, CJK, emoji, code, whitespace runs, special tokens."""

from __future__ import annotations

import random


def mixed_strings(count: int, seed: int = 0) -> list[str]:
    """The pieces alone, then ``count`` random concatenations of them."""
    rng = random.Random(seed)
    pieces = ["Hello", " world", "naïve", " café", "Ünïcödé", "中文", "日本語のテキスト", "한국어", "🙂", "👩‍💻", "🇫🇷",
              "def f(x):\n", "    return x ** 2\n", "\t", "  ", "   \n\n", "{\"key\": [1, 2.5e-3]}", "<|im_start|>",
              "<|im_end|>", "<|endoftext|>", "<file_sep>", "1234567", "3.14159", "don't", "I'll", " THE END. ",
              "https://example.com/a?b=c", "€£¥", "\u00a0", "x" * 40, " " * 17]
    return [""] + pieces + ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(count)]
