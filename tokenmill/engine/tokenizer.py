"""Tokenizers: Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library) and llama2.c ``tokenizer.bin``.

Both expose the same small interface: ``encode``, ``decode``, ``bos_token_id``,
``eos_token_ids``, ``vocab_size`` and ``apply_chat_template``.
"""

from __future__ import annotations

import heapq
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

    def min_num_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text, add_special_tokens=False))``, in O(len(text)) and far
        cheaper than encoding: lets an over-long prompt be refused before it is tokenized. 0 when
        this tokenizer gives no such bound."""
        return 0

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        """Renders ``messages`` with ``chat_template`` (default: the model's) in a sandboxed Jinja environment."""
        from tokenmill.engine.chat_template import render_chat_template

        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise TokenizerError("this model's tokenizer has no chat template (tokenizer_config.json): give one "
                                 "(chat_template), or send a plain prompt to completions instead")
        return render_chat_template(template, messages, add_generation_prompt,
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
        self._init_from(self._tok, template or (jinja.read_text() if jinja.is_file() else None),
                        _token_content(config.get("bos_token")) or "", _token_content(config.get("eos_token")) or "",
                        _id_list(generation.get("eos_token_id")))

    def _init_from(self, tok, chat_template: str | None, bos_token: str, eos_token: str,
                   extra_eos_ids: list[int]) -> None:
        """Everything else from the tokenizers object and the special tokens (shared by every source)."""
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = [self._tok.token_to_id(self.eos_token)] if self.eos_token else []
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids + list(extra_eos_ids) if i is not None))
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._max_chars_per_token = _max_chars_per_token(json.loads(self._tok.to_str()),
                                                         self._tok.get_vocab(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a long prompt tokenized in a
        # worker thread then never stalls the server's event loop.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def min_num_tokens(self, text: str) -> int:
        if not self._max_chars_per_token:
            return 0
        normalizer = self._tok.normalizer
        length = len(normalizer.normalize_str(text)) if normalizer is not None else len(text)
        return -(-length // self._max_chars_per_token)

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
        self.max_piece_bytes = max(len(p) for i, p in enumerate(self.pieces) if not 3 <= i <= 258)
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
        tokens = self._merge(tokens)
        return [self.BOS] + tokens if add_special_tokens else tokens

    def _merge(self, tokens: list[int]) -> list[int]:
        """run.c's merge loop (merge the adjacent pair with the highest score, the leftmost on a
        tie, until none is in the vocabulary) in O(n log n): candidate pairs wait in a heap keyed by
        (-score, left position), and an entry whose pair has changed since it was pushed is skipped.

        Symbol i keeps its position i while it grows by absorbing its right neighbour, so positions
        stay in text order and the heap's smallest key is exactly the pair run.c's scan would pick.
        """
        n = len(tokens)
        right = list(range(1, n + 1))  # right[i]: the next live symbol (n: none)
        left = list(range(-1, n - 1))  # left[i]: the previous live symbol (-1: none)

        def candidate(i: int) -> tuple[float, int, int, int, int] | None:
            """The heap entry of the pair (i, right[i]) if it merges into a vocabulary piece."""
            j = right[i]
            if i < 0 or j >= n:
                return None
            merged = self.lookup.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])
            return None if merged is None else (-self.scores[merged], i, j, tokens[i], tokens[j])

        heap = [entry for i in range(n - 1) if (entry := candidate(i)) is not None]
        heapq.heapify(heap)
        live = [True] * n
        while heap:
            _, i, j, token_i, token_j = heapq.heappop(heap)
            if not live[i] or right[i] != j or tokens[i] != token_i or tokens[j] != token_j:
                continue  # stale: one side was merged since this pair was pushed
            tokens[i] = self.lookup[self.pieces[token_i] + self.pieces[token_j]]
            live[j] = False
            right[i] = right[j]
            if right[j] < n:
                left[right[j]] = i
            for k in (left[i], i):  # the two pairs this merge changed
                if (entry := candidate(k)) is not None:
                    heapq.heappush(heap, entry)
        return [t for t, alive in zip(tokens, live) if alive]

    def min_num_tokens(self, text: str) -> int:
        if not text:
            return 0
        # A token covers at most max_piece_bytes bytes of " " + text (a byte-fallback token covers one).
        num_bytes = len(text.encode("utf-8", errors="surrogatepass")) + 1
        return -(-num_bytes // self.max_piece_bytes)

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
