"""The tokenizer a GGUF file carries in its metadata (``tokenizer.ggml.*``), rebuilt with the
``tokenizers`` library so that it encodes as transformers' GGUF loading does.

- ``gpt2``: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (a token spelled otherwise
  is respelled byte by byte); merges come from the file; text is split by the regex that the
  vocabulary was trained with (``tokenizer.ggml.pre``), GPT-2's own for names not listed here.
- ``llama``: SentencePiece BPE (Llama 2, Mistral): merges from the file, or derived from the
  pieces' scores; byte fallback; BOS added unless the file says not to.
- Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens, so
  that both are matched whole in text.
- BOS is prepended when ``tokenizer.ggml.add_bos_token`` says so; the chat template is
  ``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path

from tokenmill.engine.tokenizer import HFTokenizer
from tokenmill.errors import TokenizerError

_LLAMA3_SPLIT = (  # the split regex of Llama 3's (tiktoken-style) vocabulary
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


class GGUFTokenizer(HFTokenizer):
    def __init__(self, path: str | Path):
        from tokenmill.models.gguf import metadata, open_gguf

        meta = metadata(open_gguf(path))
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: gpt2 "
                                 "(byte-level BPE), llama (SentencePiece BPE). Pass the model's Hugging Face "
                                 "tokenizer folder with --tokenizer (tokenizer=...), or give token ids "
                                 "(skip_tokenizer_init)")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = meta.get("tokenizer.ggml.merges")
        if kind == "gpt2":
            tok = _byte_level_bpe(tokens, merges or [], meta.get("tokenizer.ggml.pre"))
            spelled = set(_byte_alphabet().values())
        else:
            tok = _sentencepiece_bpe(tokens, merges, meta.get("tokenizer.ggml.scores"))
            spelled = None
        add_bos_default = kind == "llama"  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say
        from tokenizers import AddedToken

        # A "control" token spelled outside the byte alphabet is a mislabel: adding it would grow the vocabulary.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
                                if kind == _CONTROL and (spelled is None or set(t) <= spelled)])
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
                        if kind == _USER_DEFINED])

        def token(key: str) -> str:
            index = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else ""

        bos, eos = token("bos"), token("eos")
        if meta.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos:
            from tokenizers import processors

            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, tokens.index(bos))])
        self._init_from(tok, meta.get("tokenizer.chat_template"), bos, eos, [])


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, index)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    split = _SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], merges: list[str] | None, scores: list[float] | None):
    """SentencePiece BPE as Hugging Face's Llama tokenizer runs it: "▁" for spaces and before the
    text, unknown characters as <0xXX> byte tokens, decoded back with the first space stripped."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores or [0.0] * len(tokens))))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies (GGUF files of such models carry scores, not
    merges): every split of a piece into two pieces of the vocabulary, ranked by the merged piece's
    score, best first; among equals the shorter left part first (then the shorter right), and
    otherwise by vocabulary order of the pieces, then of the parts. Python's sort is stable, so
    this is also the order transformers derives."""
    candidates = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda parts: (vocab[parts[0]], vocab[parts[1]]))
        candidates.extend((left, right, score) for left, right in splits)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]
