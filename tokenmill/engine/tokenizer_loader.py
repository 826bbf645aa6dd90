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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


_DROPPING_PRE_TOKENIZERS = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"}


def _max_chars_per_token(spec: dict[str, Any], vocab: dict[str, int]) -> int:
    """The most (normalized) characters one token can stand for, or 0 when no bound is safe.

    A BPE token covers at most as many characters as its vocabulary string has: byte-level BPE
    spells every byte as one character, and SentencePiece-style BPE spells a space as one "▁".
    The bound fails where text can vanish or collapse into one token: pre-tokenizers that drop
    whitespace or delimiters, added tokens that strip the whitespace beside them, and unknown runs
    fused into one <unk> (without byte fallback); it also needs a BPE model (WordPiece and Unigram
    can map a whole unknown word to one token).
    """
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return 0
    pre_tokenizer = spec.get("pre_tokenizer")
    if _component_types(pre_tokenizer) & _DROPPING_PRE_TOKENIZERS or '"removed"' in json.dumps(pre_tokenizer):
        return 0  # whitespace or delimiters dropped (Split with behavior "removed")
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return 0  # such a token also swallows the whitespace beside it, however long
    return max((len(token) for token in vocab), default=0)


def _component_types(component: Any) -> set[str]:
    """The "type" names in a tokenizer.json component, through Sequence nesting."""
    if isinstance(component, dict):
        found = {component.get("type")} if isinstance(component.get("type"), str) else set()
        for value in component.values():
            found |= _component_types(value)
        return found
    if isinstance(component, list):
        return set().union(*(_component_types(item) for item in component)) if component else set()
    return set()
