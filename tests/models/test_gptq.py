"""GPTQ checkpoints as the hub has them: the engine's logits equal transformers' float32 model that
holds the weights the checkpoint encodes, for every format variant."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.gptq_checkpoints import GPTQSpec, gptq_test_config, make_gptq_checkpoint
from helpers.parity import greedy_steps_match
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear

PROMPT = [1, 17, 45, 99, 3, 250, 77, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


CASES = {
    "4bit-g32-sym-v1": ("llama", GPTQSpec(bits=4, group_size=32, sym=True)),
    "4bit-g32-asym-v1": ("llama", GPTQSpec(bits=4, group_size=32, sym=False)),
    "4bit-g32-asym-v2": ("llama", GPTQSpec(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")),
    "4bit-g32-actorder-asym": ("llama", GPTQSpec(bits=4, group_size=32, sym=False, desc_act=True)),
    "4bit-channel-sym": ("llama", GPTQSpec(bits=4, group_size=-1, sym=True)),
    "4bit-g16-odd-actorder": ("llama_odd", GPTQSpec(bits=4, group_size=16, sym=False, desc_act=True)),
    "8bit-g32-asym-v2": ("llama", GPTQSpec(bits=8, group_size=32, sym=False, checkpoint_format="gptq_v2")),
    "8bit-channel-sym-actorder": ("llama_odd", GPTQSpec(bits=8, group_size=-1, sym=True, desc_act=True)),
    "4bit-qwen2-quantize_config": ("qwen2", GPTQSpec(bits=4, group_size=32, sym=False, config_file="quantize_config.json")),
    "4bit-gpt2": ("gpt2", GPTQSpec(bits=4, group_size=64, sym=True)),
    "4bit-down-left-float": ("llama", GPTQSpec(bits=4, group_size=32, skip=("down_proj",))),
}


@pytest.mark.parametrize("kernels", ["kernels", "portable"])
@pytest.mark.parametrize("case", list(CASES))
def test_gptq_logits_match_dequantized_reference(case, kernels, tmp_path, make_llm, monkeypatch):
    if kernels == "portable":
        monkeypatch.setenv("TOKENMILL_NO_CPU_KERNELS", "1")
    kind, spec = CASES[case]
    reference = make_gptq_checkpoint(tmp_path / case, gptq_test_config(kind), spec)
    llm = make_llm(tmp_path / case, dtype="float32", block_size=4)
    model = llm.engine.core.runner.model
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear) and m.qmatrix is not None}
    # 2 layers x (qkv, o, gate_up, down), or GPT-2's (c_attn, attn.c_proj, c_fc, mlp.c_proj); never the head.
    expected = 6 if spec.skip else 8
    assert len(quantized) == expected
    _, widths = greedy_steps_match(llm.engine.core, PROMPT, 6, reference, label=case)
    assert widths[0] == len(PROMPT)


@pytest.mark.parametrize("case", ["4bit-g32-actorder-asym", "4bit-g16-odd-actorder", "8bit-g32-asym-v2"])
def test_gptq_layers_dequantize_to_the_formula(case, tmp_path, make_llm):
    """Each quantized layer's dequantized weight equals scale * (q - zero) of the checkpoint (the
    reference model holds exactly that), merged projections included."""
    kind, spec = CASES[case]
    reference = make_gptq_checkpoint(tmp_path / case, gptq_test_config(kind), spec)
    llm = make_llm(tmp_path / case, dtype="float32")
    layer = llm.engine.core.runner.model.model.layers[1]
    ref_layer = reference.model.layers[1]
    qkv = torch.cat([ref_layer.self_attn.q_proj.weight, ref_layer.self_attn.k_proj.weight,
                     ref_layer.self_attn.v_proj.weight])
    gate_up = torch.cat([ref_layer.mlp.gate_proj.weight, ref_layer.mlp.up_proj.weight])
    for ours, theirs in [(layer.self_attn.qkv_proj, qkv), (layer.mlp.gate_up_proj, gate_up),
                         (layer.mlp.down_proj, ref_layer.mlp.down_proj.weight)]:
        torch.testing.assert_close(ours.qmatrix.dequantize(), theirs.detach(), atol=1e-6, rtol=1e-6)


def _rewrite_quantgptq_test_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"bits": 3}, "bits = 3 is not supported; supported: 4, 8"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format = 'marlin' is not supported"),
    ({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
    ({"group_size": 0}, "group_size = 0 must be a positive integer or -1"),
])
def test_unsupported_gptq_configs_are_refused_naming_the_field(changes, message, tmp_path):
    from tokenmill import LLM

    folder = tmp_path / "ckpt"
    make_gptq_checkpoint(folder, gptq_test_config("llama"), GPTQSpec())
    _rewrite_quantgptq_test_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(str(folder), device="cpu", kv_cache_memory="8MiB")


def test_gptq_checkpoint_refuses_a_second_quantization(tmp_path):
    from tokenmill import LLM

    make_gptq_checkpoint(tmp_path / "ckpt", gptq_test_config("llama"), GPTQSpec())
    with pytest.raises(ModelLoadError, match="is a gptq checkpoint already"):
        LLM(str(tmp_path / "ckpt"), device="cpu", kv_cache_memory="8MiB", quantization="int8")


def test_mismatched_act_order_across_merged_projections_is_refused(tmp_path):
    """q, k and v read the same input, so GPTQ gives them one g_idx; a checkpoint where they differ
    cannot be merged and is refused rather than silently mis-ordered."""
    from safetensors.torch import load_file, save_file

    from tokenmill import LLM

    folder = tmp_path / "ckpt"
    make_gptq_checkpoint(folder, gptq_test_config("llama"), GPTQSpec(desc_act=True))
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    state[name] = state[name].flip(0).contiguous()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"self_attn\.[qkv]_proj\.g_idx.*differs from the other merged projections"):
        LLM(str(folder), device="cpu", kv_cache_memory="8MiB")
