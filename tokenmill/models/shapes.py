"""Named model shapes with seeded random weights, for measuring realistic sizes without downloads."""

from __future__ import annotations

from tokenmill.config import ModelConfig

SHAPES: dict[str, ModelConfig] = {
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads (3 KV), MLP 1536, vocabulary 49152, tied embeddings.
    "smollm2-135m": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,)),
    # Llama-3.2-1B-like: hidden 2048, 16 layers, 32 heads (8 KV), MLP 8192, vocabulary 128256, tied.
    "llama-1b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=8192, norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001,)),
    # A tiny shape for quick checks.
    "tiny-llama": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,)),
}
