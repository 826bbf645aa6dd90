"""Weights quantized at load (int8, int4) through the whole engine: logits equal transformers'
float32 model holding the same dequantized weights, and the engine's invariants hold (batch
independence, preemption, prefix caching, beam search)."""

from __future__ import annotations

import random

import pytest
import torch

from helpers.checkpoints import load_reference
from helpers.parity import greedy_steps_match
from tokenmill import SamplingParams
from tokenmill.kernels import cpu_kernels
from tokenmill.layers.linear import Linear

ARCH = "llama3"  # hidden 64, intermediate 96: every layer fits int4 groups of 32; tied embeddings
SCHEMES = {"int8": dict(quantization="int8"), "int4": dict(quantization="int4", quantization_group_size=32),
           "int4-g64": dict(quantization="int4", quantization_group_size=64)}


def _dequantized_reference(folder, model):
    """transformers' float32 model with every projection replaced by our dequantized weight."""
    reference = load_reference(folder)
    for ref_layer, layer in zip(reference.model.layers, model.model.layers):
        attn, mlp = ref_layer.self_attn, ref_layer.mlp
        q, k, v = layer.self_attn.qkv_proj.qmatrix.dequantize().split(layer.self_attn.sizes)
        gate, up = layer.mlp.gate_up_proj.qmatrix.dequantize().chunk(2)
        for target, weight in [(attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v), (mlp.gate_proj, gate),
                               (mlp.up_proj, up), (attn.o_proj, layer.self_attn.o_proj.qmatrix.dequantize()),
                               (mlp.down_proj, layer.mlp.down_proj.qmatrix.dequantize())]:
            target.weight = torch.nn.Parameter(weight, requires_grad=False)
    # A new Parameter unties the head from the embedding, which stays in float.
    reference.lm_head.weight = torch.nn.Parameter(model.lm_head.qmatrix.dequantize(), requires_grad=False)
    return reference


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_logits_equal_reference_with_dequantized_weights(scheme, checkpoint, make_llm):
    folder = checkpoint(ARCH)
    llm = make_llm(folder, dtype="float32", block_size=4, **SCHEMES[scheme])
    model = llm.engine.core.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.qmatrix is not None and m.weight is None for m in linears)
    assert model.lm_head.qmatrix.bits == 8 and model.lm_head.qmatrix.group_size == 64  # the head: int8 groups of 64
    reference = _dequantized_reference(folder, model)
    prompt = [1, 17, 45, 99, 3, 250, 77, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    greedy_steps_match(llm.engine.core, prompt, 6, reference, label=scheme)
    # Quantization changed the weights (the test is not comparing the float model with itself).
    float_reference = load_reference(folder)
    assert not torch.equal(float_reference.model.layers[0].mlp.down_proj.weight,
                           reference.model.layers[0].mlp.down_proj.weight)


def _prompts(n: int = 6, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("scheme, dtype", [("int8", "float32"), ("int4", "float32"), ("int8", "bfloat16"),
                                           ("int4-g64", "bfloat16")])
def test_invariants_hold_with_quantized_weights(scheme, dtype, checkpoint, make_llm):
    """bf16 + int8 / int4 in groups of 64: panels with int8 activations (on CPUs with AVX512-VNNI), every
    batch size."""
    folder = checkpoint(ARCH)
    alone = make_llm(folder, dtype=dtype, **SCHEMES[scheme])
    if dtype == "bfloat16" and cpu_kernels() is not None and cpu_kernels().quant_panels_available():
        assert alone.engine.core.runner.model.model.layers[0].mlp.gate_up_proj.qmatrix.panels
    expected = [_tokens(alone.generate(p, GREEDY, use_tqdm=False))[0] for p in _prompts()]

    together = make_llm(folder, dtype=dtype, **SCHEMES[scheme])
    assert _tokens(together.generate(_prompts(), GREEDY, use_tqdm=False)) == expected

    # Room for about one request at a time: requests are preempted and recomputed. In bf16 the
    # recomputed tokens go through the prefill attention, whose rounding differs from decode's, so
    # only float32 promises the same tokens after a preemption.
    if dtype == "float32":
        cfg = together.engine.model_config
        bytes_per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * 4
        tight = make_llm(folder, dtype=dtype, block_size=4, kv_cache_memory=18 * bytes_per_block,
                         **SCHEMES[scheme])
        assert _tokens(tight.generate(_prompts(), GREEDY, use_tqdm=False)) == expected
        assert tight.engine.core.scheduler.num_preemptions > 0

    # A shared prefix is served from the cache and changes nothing.
    shared = [{"prompt_token_ids": _prompts()[0]["prompt_token_ids"] * 2 + [5, 6, 7]}] * 2
    first = together.generate(shared[0], GREEDY, use_tqdm=False)[0]
    second = together.generate(shared[1], GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0 and second.outputs[0].token_ids == first.outputs[0].token_ids


def test_beam_search_with_int4_weights_matches_reference_in_a_mixed_batch(checkpoint, make_llm):
    folder = checkpoint(ARCH)
    llm = make_llm(folder, dtype="float32", **SCHEMES["int4"])
    reference = _dequantized_reference(folder, llm.engine.core.runner.model)
    prompt = _prompts()[1]["prompt_token_ids"]
    beams = SamplingParams(beam_width=3, n=3, max_tokens=8)
    outputs = llm.generate([_prompts()[0], {"prompt_token_ids": prompt}, _prompts()[2]], [GREEDY, beams, GREEDY],
                           use_tqdm=False)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, max_new_tokens=8,
                                      do_sample=False, eos_token_id=2, pad_token_id=2)[:, len(prompt):].tolist()
    assert len(outputs[1].outputs) == 3
    for completion, sequence in zip(outputs[1].outputs, expected):
        tokens = completion.token_ids
        assert sequence[:len(tokens)] == tokens and set(sequence[len(tokens):]) <= {2}


def test_a_layer_that_cannot_hold_the_groups_stays_float_with_a_warning(checkpoint, make_llm, caplog):
    """llama3's down_proj has 96 inputs: not a multiple of int4 groups of 64 (like stories260K's 172)."""
    llm = make_llm(checkpoint(ARCH), dtype="float32", quantization="int4", quantization_group_size=64)
    layer = llm.engine.core.runner.model.model.layers[0]
    down = layer.mlp.down_proj
    assert down.qmatrix is None and type(down.quant_method).__name__ == "RTNLinearMethod"  # kept float (prepacked)
    assert (down.weight if down.weight is not None else down.packed_weight).dtype == torch.float32
    assert layer.mlp.gate_up_proj.qmatrix is not None
    assert "model.layers.0.mlp.down_proj: 96 inputs are not a multiple of the group size 64" in caplog.text
    outputs = llm.generate(_prompts()[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)


@pytest.mark.parametrize("arch", ["llama3", "llama", "qwen3", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_analyze_counts_what_the_engine_allocates(arch, scheme, checkpoint, make_llm):
    """`tokenmill analyze --dtype int8|int4` and the engine agree to the byte on weights (codes,
    scales, layers left in float, the int8 head, float32 norms; experts and routers in float, shared
    experts and dense layers quantized) and on KV bytes per token."""
    import json

    from tokenmill.analysis.memory import kv_bytes_per_token, memory_report
    from tokenmill.analysis.model_shape import ModelShape
    from tokenmill.engine.memory import kv_bytes_per_token as engine_kv_bytes_per_token
    from tokenmill.models.loader import weight_bytes

    folder = checkpoint(arch)
    llm = make_llm(folder, dtype="float16", quantization=scheme)  # analyze's int8/int4 compute in fp16
    shape = ModelShape.from_hf(json.loads((folder / "config.json").read_text()))
    kernels = cpu_kernels()
    panels = kernels is not None and kernels.quant_panels_available()  # what `analyze --hardware cpu` reports
    report = memory_report(shape, 1, 16, 16, scheme, "fp16", 1e12, 1, quant_panels=panels)
    assert report.weight_bytes == weight_bytes(llm.engine.core.runner.model)
    assert kv_bytes_per_token(shape, "fp16") == engine_kv_bytes_per_token(llm.engine.model_config, torch.float16)


def test_analyze_counts_groups_of_32_as_the_engine_holds_them(checkpoint, make_llm):
    """int4 in groups of 32: where the CPU has panel kernels, such codes take panels too (a float16 scale
    and a byte zero per group and output), and `analyze` counts the bytes the engine holds."""
    import json

    from tokenmill.analysis.memory import weight_bytes_quantized
    from tokenmill.analysis.model_shape import ModelShape
    from tokenmill.models.loader import weight_bytes

    folder = checkpoint("llama3")
    llm = make_llm(folder, dtype="float16", quantization="int4", quantization_group_size=32)
    shape = ModelShape.from_hf(json.loads((folder / "config.json").read_text()))
    kernels = cpu_kernels()
    panels = kernels is not None and kernels.quant_panels_available()
    expected = weight_bytes_quantized(shape, "int4", "fp16", group_size=32, panels=panels)
    assert expected == weight_bytes(llm.engine.core.runner.model)
