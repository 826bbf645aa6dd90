"""Shared fixtures: tiny reference checkpoints and engines that must end with every KV block free."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors (read at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.checkpoints import make_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch) -> folder of a tiny random model of that architecture, made once per session."""
    made: dict[tuple, Path] = {}

    def get(arch: str, **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return made[key]

    return get


@pytest.fixture
def make_llm():
    """make_llm(model, **kwargs) -> LLM; after the test, every KV block must be free and consistent."""
    from tokenmill import LLM

    llms = []

    def make(model, **kwargs):
        kwargs.setdefault("kv_cache_memory", "8MiB")
        kwargs.setdefault("device", "cpu")
        llm = LLM(str(model), **kwargs)
        llms.append(llm)
        return llm

    yield make
    for llm in llms:
        core = llm.engine.core
        core.check_integrity()
        assert not core.has_unfinished_requests(), "requests left unfinished"
        assert core.all_blocks_free(), f"KV blocks leaked: {core.kv_cache_manager.num_free_blocks}/{core.num_blocks} free"
        llm.shutdown()  # tensor-parallel workers
