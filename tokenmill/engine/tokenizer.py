"""Tokenizers: Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library) and llama2.c ``tokenizer.bin``.

Both expose the same small interface: ``encode``, ``decode``, ``bos_token_id``,
``eos_token_ids``, ``vocab_size`` and ``apply_chat_template``.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from tokenmill.errors import TokenizerError


class BaseTokenizer(ABC):
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    special_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS (if it uses one) first."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; incomplete UTF-8 at the end decodes to U+FFFD."""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the model's chat template in a sandboxed Jinja environment."""
        from tokenmill.engine.chat_template import render_chat_template

        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json); use generate() "
                                 "with a plain prompt instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)


class HFTokenizer(BaseTokenizer):
    """A Hugging Face fast tokenizer from a folder with ``tokenizer.json`` (and ``tokenizer_config.json``)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json found")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"
        self.chat_template = template or (jinja.read_text() if jinja.is_file() else None)
        self.bos_token = _token_content(config.get("bos_token")) or ""
        self.eos_token = _token_content(config.get("eos_token")) or ""
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = [self._tok.token_to_id(self.eos_token)] if self.eos_token else []
        eos_ids += _id_list(generation.get("eos_token_id"))
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


class Llama2cTokenizer(BaseTokenizer):
    """llama2.c's ``tokenizer.bin``: SentencePiece-style BPE by merge scores, with byte fallback.

    Encodes and decodes exactly as llama2.c's ``run.c``: a leading space (dummy prefix) before
    non-empty text, characters (or their ``<0xXX>`` byte pieces) merged greedily by the highest
    score; decoding strips the leading space of the piece that follows BOS.
    """

    BOS, EOS = 1, 2

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: llama2.c tokenizer file not found")
        data = path.read_bytes()
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        try:
            offset = 4  # int32 max_token_length
            while offset < len(data):
                score, length = struct.unpack_from("<fi", data, offset)
                offset += 8
                if length < 0 or offset + length > len(data):
                    raise struct.error("piece runs past the end")
                self.pieces.append(data[offset:offset + length])
                self.scores.append(score)
                offset += length
        except struct.error as e:
            raise TokenizerError(f"{path}: not a llama2.c tokenizer file ({e})") from None
        if len(self.pieces) < 259:
            raise TokenizerError(f"{path}: only {len(self.pieces)} tokens; a llama2.c tokenizer has >= 259")
        self.lookup = {piece: i for i, piece in reversed(list(enumerate(self.pieces)))}
        self.bos_token_id, self.eos_token_ids = self.BOS, (self.EOS,)
        self.special_ids = frozenset({0, self.BOS, self.EOS})
        self.bos_token, self.eos_token = "<s>", "</s>"

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokens: list[int] = []
        if text:
            text = " " + text  # SentencePiece's dummy prefix
        for char in text:
            piece = char.encode("utf-8")
            if piece in self.lookup:
                tokens.append(self.lookup[piece])
            else:
                tokens.extend(b + 3 for b in piece)  # byte fallback: <0x00> is token 3
        while True:
            best_score, best_index, best_id = float("-inf"), -1, -1
            for i in range(len(tokens) - 1):
                merged = self.lookup.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best_score, best_index, best_id = self.scores[merged], i, merged
            if best_index < 0:
                break
            tokens[best_index:best_index + 2] = [best_id]
        return [self.BOS] + tokens if add_special_tokens else tokens

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        previous = None
        for token in token_ids:
            if not 0 <= token < len(self.pieces):
                raise TokenizerError(f"token id {token} is outside the vocabulary (0..{len(self.pieces) - 1})")
            if token in self.special_ids and skip_special_tokens:
                previous = token
                continue
            piece = self.pieces[token]
            if previous == self.BOS and piece.startswith(b" "):
                piece = piece[1:]
            if 3 <= token <= 258:  # <0xXX> byte pieces
                piece = bytes([token - 3])
            out += piece
            previous = token
        return out.decode("utf-8", errors="replace")


def load_tokenizer(model: str | Path, tokenizer: str | Path | None = None) -> BaseTokenizer:
    """The tokenizer for a model: ``tokenizer`` if given (a folder or a llama2.c .bin), else the model folder's."""
    source = Path(tokenizer) if tokenizer is not None else Path(model)
    if source.is_file() and source.suffix == ".bin":
        return Llama2cTokenizer(source)
    if source.is_dir():
        return HFTokenizer(source)
    if tokenizer is None and source.is_file():
        raise TokenizerError(f"{source} is a checkpoint file: pass its tokenizer (e.g. tokenizer=\"tok512.bin\")")
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
