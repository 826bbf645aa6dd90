"""Configuration conversion and validation."""

from __future__ import annotations

import pytest

from tokenmill.config import ModelConfig, RopeScaling
from tokenmill.engine.memory import parse_memory
from tokenmill.errors import ModelLoadError


def test_parse_memory_units():
    assert parse_memory(1024) == 1024
    assert parse_memory(0.5) == 2**29
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5GB") == 1_500_000_000
    for bad in ("lots", "-1GiB", "3 parsecs", 0, True):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_from_hf_reads_old_and_new_rope_fields():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}
    old = ModelConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    assert old == new and old.rope_scaling == RopeScaling("linear", 2.0) and old.num_key_value_heads == 2
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn' is not supported"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match="lacks the field 'hidden_size'"):
        ModelConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ModelLoadError, match="must be a multiple"):
        ModelConfig.from_hf({**base, "num_attention_heads": 2, "num_key_value_heads": 3})
