"""Tiny random Hugging Face checkpoints (made with transformers, the reference) and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384

CORPUS = [
    "Once upon a time there was a little robot who loved to count tokens.",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Paged attention keeps the KV cache in fixed-size blocks, like pages of memory.",
    "Continuous batching lets new requests join while others are still decoding.",
    "She said hello to the world and the world said hello back.",
    "Numbers like 12345 and 67890 appear in text; so do emoji 🙂 and 中文 characters.",
] * 20

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A small byte-level BPE tokenizer with <s>/</s>, written as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))


def _configs():
    from transformers import (GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig,
                              Qwen3Config, Qwen3MoeConfig)

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return {
        # GQA 3:1, untied head, odd sizes.
        "llama": LlamaConfig(hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                             tie_word_embeddings=False, **common),
        # Llama 3 style: rope_scaling llama3, tied embeddings, GQA 2:1.
        "llama3": LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                              tie_word_embeddings=True, **common),
        # Linear rope scaling, multi-head (no GQA), attention bias.
        "llama_linear": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True,
                                    mlp_bias=True, **common),
        "mistral": MistralConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=1, max_position_embeddings=256, sliding_window=None,
                                 **common),
        "qwen2": Qwen2Config(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                             num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True,
                             **common),
        "qwen3": Qwen3Config(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                             tie_word_embeddings=False, **common),
        "gpt2": GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=256, **common),
        # For tensor parallelism: one KV head (replicated at degree 2 and 4), a vocabulary of 381 (split
        # unevenly), a tied head, and biases on every projection (row-parallel ones added once).
        "llama_tp": LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, max_position_embeddings=256, attention_bias=True,
                                mlp_bias=True, tie_word_embeddings=True, **{**common, "vocab_size": 381}),
        # Mixture of experts: 4 experts, top 2, in every layer; weights renormalised, weighed in float32.
        "mixtral": MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                 max_position_embeddings=256, sliding_window=None, **common),
        # A gated shared expert, unnormalised top-2 of 6, and a dense middle layer (mlp_only_layers).
        "qwen2_moe": Qwen2MoeConfig(hidden_size=32, intermediate_size=56, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=False, mlp_only_layers=[1], max_position_embeddings=256,
                                    tie_word_embeddings=False, **common),
        # q/k norms, renormalised top-3 of 5, experts every second layer (decoder_sparse_step 2).
        "qwen3_moe": Qwen3MoeConfig(hidden_size=32, intermediate_size=56, moe_intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    num_experts=5, num_experts_per_tok=3, norm_topk_prob=True,
                                    decoder_sparse_step=2, max_position_embeddings=256,
                                    tie_word_embeddings=False, **common),
    }


ARCHITECTURES = ["llama", "llama3", "llama_linear", "mistral", "qwen2", "qwen3", "gpt2"]
MOE_ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe"]


def make_checkpoint(folder: Path, arch: str, seed: int = 0, max_shard_size: str | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Saves a random model of ``arch`` with transformers, plus a trained tokenizer; returns the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]
    model = AutoModelForCausalLM.from_config(config)
    _scale_up(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    train_tokenizer(folder)
    return folder


def _scale_up(model: torch.nn.Module, seed: int) -> None:
    """Random init with std 0.02 gives near-uniform logits, where greedy ties make comparisons weak;
    larger weights (and random norm weights and biases) give decisive, distinct tokens."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            elif "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def load_reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
