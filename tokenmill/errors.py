"""Exceptions that tokenmill raises for user-facing mistakes; each message names the bad value."""


class TokenmillError(Exception):
    """Base class of every error tokenmill raises on purpose."""


class ModelLoadError(TokenmillError):
    """A model folder, checkpoint file or configuration cannot be loaded."""


class TokenizerError(TokenmillError):
    """A tokenizer file is missing or malformed, or a chat template cannot be rendered."""


class RequestError(TokenmillError, ValueError):
    """A request cannot be served as given (too long, bad prompt, bad sampling value)."""
