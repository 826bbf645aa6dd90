"""Exceptions that tokenmill raises for user-facing mistakes; each message names the bad value."""


class TokenmillError(Exception):
    """Base class of every error tokenmill raises on purpose."""


class ModelLoadError(TokenmillError):
    """A model folder, checkpoint file or configuration cannot be loaded."""


class TokenizerError(TokenmillError):
    """A tokenizer file is missing or malformed, or a chat template cannot be rendered."""


class RequestError(TokenmillError, ValueError):
    """A request cannot be served as given (too long, bad prompt, bad sampling value)."""


def check_unicode(text: str, field: str) -> None:
    """Raises RequestError if ``text`` cannot be encoded as UTF-8 (it holds a lone surrogate, which
    JSON's \\ud800 escapes can smuggle in); the message names the field and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{field} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}: "
                           "text must be valid Unicode") from None
