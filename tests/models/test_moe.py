"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): routing as transformers routes, the
engine's invariants with expert layers, load-time errors, and weight quantization beside float
experts. Logit and greedy parity with transformers are in test_parity.py."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.checkpoints import MOE_ARCHITECTURES
from tokenmill import SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import Linear
from tokenmill.layers.moe import FusedMoE, GateLinear, route


def test_route_takes_softmax_top_k_and_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.5, 0.5]])
    probs = torch.softmax(logits, -1)
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 2], [2, 1]]
    torch.testing.assert_close(weights, torch.stack([probs[0, [0, 2]], probs[1, [2, 1]]]))
    normalised, same_ids = route(logits, 2, renormalize=True)
    assert torch.equal(same_ids, ids)
    torch.testing.assert_close(normalised, weights / weights.sum(-1, keepdim=True))
    assert normalised.dtype == torch.float32


def test_experts_grouped_by_expert_equal_a_per_token_loop():
    """The grouped computation against the definition: for each token, sum over its chosen experts
    of weight * down(silu(gate(x)) * up(x))."""
    torch.manual_seed(0)
    num_experts, hidden, inter, tokens, top_k = 5, 8, 6, 7, 2
    experts = FusedMoE(num_experts, hidden, inter)
    experts.w13.data.normal_()
    experts.w2.data.normal_()
    x = torch.randn(tokens, hidden)
    weights, ids = route(torch.randn(tokens, num_experts), top_k, renormalize=True)
    got = experts(x, weights, ids, torch.float32)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = ids[t, j]
            gate, up = (experts.w13[e] @ x[t]).split(inter)
            expected[t] += weights[t, j] * (experts.w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _prompts(n: int = 6, seed: int = 4) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [1] + [rng.randrange(3, 380) for _ in range(rng.randint(3, 40))]} for _ in range(n)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_batch_invariance_and_preemption_with_experts(arch, checkpoint, make_llm):
    folder = checkpoint(arch)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = make_llm(folder, dtype="float32")
    expected = [_tokens(alone.generate(p, params, use_tqdm=False))[0] for p in _prompts()]
    together = make_llm(folder, dtype="float32", max_num_batched_tokens=64)  # chunked prompts beside decodes
    assert _tokens(together.generate(_prompts(), params, use_tqdm=False)) == expected
    cfg = together.engine.model_config
    bytes_per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * 4
    tight = make_llm(folder, dtype="float32", block_size=4, kv_cache_memory=18 * bytes_per_block)
    assert _tokens(tight.generate(_prompts(), params, use_tqdm=False)) == expected
    assert tight.engine.core.scheduler.num_preemptions > 0


def test_int8_weights_quantize_attention_and_dense_mlps_but_not_router_or_experts(checkpoint, make_llm):
    llm = make_llm(checkpoint("qwen2_moe"), dtype="float32", quantization="int8")
    model = llm.engine.core.runner.model
    quantized = [name for name, m in model.named_modules() if isinstance(m, Linear) and m.qmatrix is not None]
    assert any(".self_attn." in n for n in quantized) and any(".shared_expert." in n for n in quantized)
    assert any("layers.1.mlp." in n for n in quantized)  # the dense layer (mlp_only_layers)
    assert all(isinstance(m, (GateLinear, FusedMoE)) for name, m in model.named_modules()
               if name.endswith((".gate", ".shared_expert_gate", ".experts")))
    out = llm.generate(_prompts(2), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)


def _copy_checkpoint(src, dst, edit_config=None, drop_tensor=None):
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    if drop_tensor:
        tensors = load_file(dst / "model.safetensors")
        del tensors[drop_tensor]
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_missing_expert_tensor_is_named(checkpoint, make_llm, tmp_path):
    folder = _copy_checkpoint(checkpoint("mixtral"), tmp_path / "m",
                              drop_tensor="model.layers.1.block_sparse_moe.experts.3.w3.weight")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.experts\.w13\[\(3, 'up'\)\]"):
        make_llm(folder, dtype="float32")


def test_more_experts_per_token_than_experts_is_refused(checkpoint, make_llm, tmp_path):
    folder = _copy_checkpoint(checkpoint("qwen3_moe"), tmp_path / "q",
                              edit_config=lambda c: c.update(num_experts_per_tok=9))
    with pytest.raises(ModelLoadError, match=r"num_experts_per_tok \(9\).*num_experts \(5\)"):
        make_llm(folder, dtype="float32")
