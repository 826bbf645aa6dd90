"""load_tokenizer: which tokenizer class reads a model's tokenizer (a folder, a GGUF file, a llama2.c .bin)."""

from __future__ import annotations

from pathlib import Path

from tokenmill.engine.gguf_tokenizer import GGUFTokenizer
from tokenmill.engine.tokenizer import BaseTokenizer, HFTokenizer, Llama2cTokenizer
from tokenmill.errors import TokenizerError
from tokenmill.models.gguf import is_gguf_file


def load_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> BaseTokenizer:
    """The tokenizer for a model: ``tokenizer`` if given (a folder, a GGUF file or a llama2.c .bin),
    else the model's (its folder, or the GGUF file's metadata)."""
    source = Path(tokenizer) if tokenizer is not None else Path(model)
    if is_gguf_file(source):
        return GGUFTokenizer(source)
    if tokenizer is None and source.is_file():  # a llama2.c checkpoint: its tokenizer is a file of its own
        raise TokenizerError(f"{source} is a checkpoint file without a tokenizer: pass its tokenizer with "
                             "--tokenizer (LLM(tokenizer=...)), e.g. the tok512.bin or tokenizer.bin beside it")
    if source.is_file() and source.suffix == ".bin":
        return Llama2cTokenizer(source)
    if source.is_dir():
        return HFTokenizer(source)
    raise TokenizerError(f"tokenizer {source} not found: expected a folder with tokenizer.json or a llama2.c .bin")
