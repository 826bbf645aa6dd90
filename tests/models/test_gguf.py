"""GGUF checkpoints against transformers loading the same file (gguf_file=...), on the real
SmolLM2-135M-Instruct (Q4_1, with a Q8_0 embedding): logits, greedy tokens, tokenizer, chat."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.parity import greedy_steps_match
from helpers.shared_models import smollm2_gguf
from helpers.text_samples import mixed_strings
from tokenmill import SamplingParams

pytest.importorskip("gguf", reason="the gguf package is not installed")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
        model = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    return model.eval(), tokenizer


def test_logits_and_greedy_tokens_match_transformers(smollm2, reference, make_llm):
    """float32 logits within 1e-4 at every prompt position and 32 decode steps; the Q/K rows that
    llama.cpp's converter reorders for its rotary layout are put back."""
    ref, _ = reference
    llm = make_llm(smollm2, dtype="float32", block_size=8)
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    tokens, _ = greedy_steps_match(llm.engine.core, prompt, 33, ref, label="SmolLM2")
    # generate stops at EOS (<|im_end|>, after "...is Paris."); our loop went on past it, still within 1e-4.
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=33, do_sample=False)[0].tolist()
    assert len(expected) > len(prompt) + 5 and tokens[:len(expected)] == expected


def test_tokenizer_encodes_and_decodes_as_transformers(smollm2, reference):
    from tokenmill.engine.tokenizer_loader import load_tokenizer

    _, ref_tokenizer = reference
    ours = load_tokenizer(smollm2)
    assert ours.vocab_size == len(ref_tokenizer)
    for text in mixed_strings(300):
        ids = ours.encode(text)
        assert ids == ref_tokenizer.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == ref_tokenizer.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == ref_tokenizer.decode(ids, skip_special_tokens=True)
    rendered = ours.apply_chat_template(QUESTION)
    assert ours.encode(rendered, add_special_tokens=False) == ref_tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_dict=False)


def test_the_known_name_answers_a_real_question(make_llm):
    """`smollm2-135m-instruct` resolves to the fetched file; greedy chat knows the capital of France."""
    smollm2_gguf()  # skips when it cannot be fetched
    llm = make_llm("smollm2-135m-instruct")
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text and out.outputs[0].finish_reason == "stop"


def test_unsupported_tensor_type_is_named(tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    from tokenmill.errors import ModelLoadError
    from tokenmill.models.gguf import read_gguf

    path = tmp_path / "q2k.gguf"
    writer = GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 64,
                       "attention.head_count": 4}.items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((16, 84), dtype=np.uint8), raw_shape=(16, 84),
                      raw_dtype=GGMLQuantizationType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config, weights = read_gguf(path)
    with pytest.raises(ModelLoadError, match="token_embd.weight has type Q2_K; supported: F32, F16, BF16, Q8_0"):
        list(weights)


def test_perplexity_equals_transformers_loss(smollm2, reference, make_llm):
    """`bench perplexity`'s number is exp of transformers' mean cross-entropy on the same tokens."""
    from tokenmill.bench.perplexity import HELD_OUT_TEXT, perplexity

    ref, _ = reference
    llm = make_llm(smollm2, dtype="float32", kv_cache_memory="64MiB")
    token_ids = llm.tokenizer.encode(HELD_OUT_TEXT)
    ours, count = perplexity(llm, token_ids, window=8191)
    with torch.no_grad():
        loss = ref(torch.tensor([token_ids]), labels=torch.tensor([token_ids])).loss
    assert count == len(token_ids) - 1
    assert ours == pytest.approx(float(loss.exp()), rel=1e-4)
    # In windows, each window's first token goes unscored and the rest see less context.
    windowed, windowed_count = perplexity(llm, token_ids, window=100)
    assert windowed_count == len(token_ids) - -(-len(token_ids) // 100) and windowed > ours
