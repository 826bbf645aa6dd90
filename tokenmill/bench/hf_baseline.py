"""Hugging Face ``transformers`` ``generate`` on the same model and workload, in static batches.

transformers is a benchmark-only dependency here: it is imported only when ``--compare-hf`` is given.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from pathlib import Path

from tokenmill.bench.workload import BenchRequest


def materialize_shape(name: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """Writes a named shape once as a Hugging Face folder (random weights from transformers' own init),
    so that tokenmill and transformers load exactly the same checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokenmill.models.fetch import cache_root
    from tokenmill.models.shapes import SHAPES

    c = SHAPES[name]
    folder = cache_root() / f"shape-{name}-{str(dtype).removeprefix('torch.')}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
                         rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
                         bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder)
    return folder


def load_hf_model(folder: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The reference model on the same device as the engine, so that the comparison is like for like."""
    from transformers import AutoModelForCausalLM

    path = Path(folder)
    if path.is_file():  # a GGUF file: transformers dequantizes it as we do
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def run_hf_static_batches(hf: nn.Module, workload: list[BenchRequest], batch_size: int) -> dict[str, float]:
    """Runs ``generate`` in static batches (left-padded, each to its longest output); counts useful tokens."""
    pad_id = 0
    device = next(hf.parameters()).device
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        max_new = max(r.output_len for r in batch)
        hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                    min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    num_out = sum(r.output_len for r in workload)
    num_in = sum(len(r.prompt_token_ids) for r in workload)
    return {"elapsed_s": elapsed, "output_tokens_per_s": num_out / elapsed,
            "total_tokens_per_s": (num_in + num_out) / elapsed, "batch_size": batch_size}
