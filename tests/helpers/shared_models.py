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
