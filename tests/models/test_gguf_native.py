"""GGUF Q8_0 / Q4_0 matrices held as stored (their codes and block scales), as llama.cpp runs them:
exact against the file's blocks, logits equal transformers on the same file, merged layers whose parts
differ and other tensor types dequantized, the tied LM head from the embedding's blocks, and the
``quantization`` values that choose (``gguf``, ``none``, ``int8``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from helpers.parity import greedy_steps_match  # noqa: E402
from models.test_gguf_tiny import _gguf_name, _hf_model, _llama_cpp_permute, independent_dequantize  # noqa: E402
from tokenmill import SamplingParams  # noqa: E402
from tokenmill.errors import ModelLoadError  # noqa: E402

PROMPT = [1, 17, 45, 60, 3, 25, 77, 12, 9]


def _write(model, arch: str, path, types: dict[str, Q], default: Q, tied: bool = False,
           file_type: int | None = None) -> dict[str, tuple]:
    """``model`` as a GGUF file, each 2-D tensor in ``types.get(name, default)``; ``tied`` leaves out the
    LM head (the embedding is the head); ``file_type``: general.file_type. Returns each quantized tensor's
    (stored blocks, type)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
                       "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
                       "attention.head_count": cfg.num_attention_heads,
                       "attention.head_count_kv": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta if hasattr(cfg, "rope_theta")
                       else cfg.rope_parameters["rope_theta"])
    stored = {}
    for name, param in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        values = param.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            values = _llama_cpp_permute(values, cfg.num_attention_heads if ".q_proj." in name
                                        else cfg.num_key_value_heads)
        qtype = types.get(name, default)
        if values.ndim == 2 and qtype != Q.F32:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
            stored[name] = (data, qtype)
        else:
            writer.add_tensor(_gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def _reference(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _methods(llm) -> dict[str, str]:
    from tokenmill.layers.linear import Linear

    return {name: m.quant_method.name for name, m in llm.engine.core.runner.model.named_modules()
            if isinstance(m, Linear)}


def _tied_model(arch: str = "llama"):
    model = _hf_model(arch)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
def test_codes_and_scales_are_the_files_blocks(qtype, tmp_path):
    """Every layer's weight, as its codes and scales give it back, equals the stored blocks read
    independently (Llama's Q/K rows in Hugging Face order), bit for bit."""
    from tokenmill.models.loader import load_model

    model = _hf_model("llama")
    stored = _write(model, "llama", tmp_path / "m.gguf", {}, qtype)
    ours, _ = load_model(str(tmp_path / "m.gguf"), "float32", torch.device("cpu"), quantization="gguf")
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for merged, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                              ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("self_attn.o_proj", ("o_proj",)),
                              ("mlp.down_proj", ("down_proj",))):
            rows = []
            for part in parts:
                name = prefix + ("self_attn." if "proj" in part and part[0] in "qkvo" else "mlp.") + part + ".weight"
                data, kind = stored[name]
                shape = tuple(model.state_dict()[name].shape)
                values = independent_dequantize(data, kind, shape)
                if part in ("q_proj", "k_proj"):  # undo the converter's interleaving of each head's rows
                    heads = cfg.num_attention_heads if part == "q_proj" else cfg.num_key_value_heads
                    values = values.reshape(heads, values.shape[0] // heads // 2, 2, -1).swapaxes(1, 2)
                    values = values.reshape(shape)
                rows.append(values)
            module = ours.get_submodule(prefix + merged)
            assert module.quant_method.name == f"gguf-{qtype.name.lower()}" and module.weight is None
            np.testing.assert_array_equal(module.qmatrix.dequantize().numpy(), np.concatenate(rows), err_msg=merged)
    head_data, head_kind = stored["lm_head.weight"]
    np.testing.assert_array_equal(ours.lm_head.qmatrix.dequantize().numpy(),
                                  independent_dequantize(head_data, head_kind, (cfg.vocab_size, cfg.hidden_size)))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_match_transformers_holding_the_dequantized_file(arch, qtype, tmp_path, make_llm):
    model = _hf_model(arch)
    path = tmp_path / f"{arch}.gguf"
    _write(model, arch, path, {}, qtype)
    llm = make_llm(path, dtype="float32", quantization="gguf", block_size=4, skip_tokenizer_init=True)
    assert set(_methods(llm).values()) == {f"gguf-{qtype.name.lower()}"}
    greedy_steps_match(llm.engine.core, PROMPT, 8, _reference(path), label=f"{arch} {qtype.name}")


def test_merged_layer_whose_parts_differ_stays_float(tmp_path, make_llm):
    """llama.cpp mixes types in one file (a Q8_0 attn_v beside Q4_0 attn_q/attn_k, F32 down): a merged
    q/k/v cannot hold two code widths, so it loads dequantized; the rest keep their blocks."""
    model = _hf_model("llama")
    path = tmp_path / "mixed.gguf"
    types = {f"model.layers.{i}.self_attn.v_proj.weight": Q.Q8_0 for i in range(2)}
    types.update({f"model.layers.{i}.mlp.down_proj.weight": Q.F32 for i in range(2)})
    types["lm_head.weight"] = Q.Q8_0
    _write(model, "llama", path, types, Q.Q4_0)
    llm = make_llm(path, dtype="float32", quantization="gguf", block_size=4, skip_tokenizer_init=True)
    methods = _methods(llm)
    assert methods["model.layers.0.self_attn.qkv_proj"] == "unquantized"
    assert methods["model.layers.1.mlp.down_proj"] == "unquantized"
    assert methods["model.layers.1.mlp.gate_up_proj"] == methods["model.layers.0.self_attn.o_proj"] == "gguf-q4_0"
    assert methods["lm_head"] == "gguf-q8_0"
    greedy_steps_match(llm.engine.core, PROMPT, 6, _reference(path), label="mixed types")


def test_tied_head_takes_the_embeddings_blocks(tmp_path, make_llm):
    """No output.weight: the head is token_embd. It runs from that matrix's Q8_0 blocks while the
    embedding's row lookups read it dequantized; logits equal transformers on the same file."""
    model = _tied_model()
    path = tmp_path / "tied.gguf"
    stored = _write(model, "llama", path, {"model.embed_tokens.weight": Q.Q8_0}, Q.Q4_0, tied=True)
    llm = make_llm(path, dtype="float32", quantization="gguf", block_size=4, skip_tokenizer_init=True)
    runner_model = llm.engine.core.runner.model
    assert _methods(llm)["lm_head"] == "gguf-q8_0"
    data, kind = stored["model.embed_tokens.weight"]
    embedding = independent_dequantize(data, kind, (model.config.vocab_size, model.config.hidden_size))
    np.testing.assert_array_equal(runner_model.lm_head.qmatrix.dequantize().numpy(), embedding)
    np.testing.assert_array_equal(runner_model.model.embed_tokens.weight.detach().numpy(), embedding)
    greedy_steps_match(llm.engine.core, PROMPT, 6, _reference(path), label="tied head")
    plain = make_llm(path, dtype="float32", quantization="gguf", block_size=4, skip_tokenizer_init=True,
                     quantize_lm_head=False)
    assert _methods(plain)["lm_head"] == "unquantized"


def test_bf16_runs_the_blocks_with_the_float32_tokens(tmp_path, make_llm):
    """bf16 activations take the integer-dot panels (int8 activations, as llama.cpp's q8_0 dot products);
    the tiny model's greedy tokens stay those of the exact float32 run, and it reads a fraction of the bytes."""
    from tokenmill.models.loader import decode_read_bytes

    model = _hf_model("llama")
    path = tmp_path / "q4.gguf"
    _write(model, "llama", path, {}, Q.Q4_0)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    runs = {}
    for dtype, quantization in (("float32", "gguf"), ("bfloat16", None), ("bfloat16", "none")):
        llm = make_llm(path, dtype=dtype, quantization=quantization, block_size=4, skip_tokenizer_init=True)
        runs[dtype, quantization] = (llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
                                     .outputs[0].token_ids, decode_read_bytes(llm.engine.core.runner.model))
    assert runs["bfloat16", None][0] == runs["float32", "gguf"][0]
    assert runs["bfloat16", None][1] < runs["bfloat16", "none"][1] / 2


def test_which_runs_keep_the_blocks(tmp_path, make_llm):
    """By default 16-bit runs keep them (a Q8_0 / Q4_0 file's ``dtype="auto"`` is bfloat16) and float32 runs
    dequantize them (float32 panels beat the exact float32 product over 32-input blocks); ``gguf`` keeps
    them in any dtype, ``none`` and ``int8`` dequantize them (int8 then rounds again, per channel)."""
    model = _hf_model("llama")
    path = tmp_path / "q8.gguf"
    _write(model, "llama", path, {}, Q.Q8_0, file_type=7)  # MOSTLY_Q8_0
    auto = make_llm(path, skip_tokenizer_init=True)
    assert auto.engine.core.runner.model.lm_head.params_dtype == torch.bfloat16
    assert set(_methods(auto).values()) == {"gguf-q8_0"}
    assert set(_methods(make_llm(path, dtype="float32", skip_tokenizer_init=True)).values()) == {"unquantized"}
    assert set(_methods(make_llm(path, dtype="bfloat16", quantization="none", skip_tokenizer_init=True)).values()) \
        == {"unquantized"}
    assert set(_methods(make_llm(path, dtype="float32", quantization="gguf", skip_tokenizer_init=True)).values()) \
        == {"gguf-q8_0"}
    int8 = _methods(make_llm(path, dtype="float32", quantization="int8", skip_tokenizer_init=True))
    assert set(int8.values()) == {"int8"}  # rounded again from the dequantized weights, per channel


def test_quantization_gguf_is_refused_without_blocks_to_keep(tmp_path, make_llm):
    model = _hf_model("llama")
    path = tmp_path / "f16.gguf"
    _write(model, "llama", path, {}, Q.F16)
    with pytest.raises(ModelLoadError, match="quantization='gguf' needs Q8_0 or Q4_0 matrices"):
        make_llm(path, dtype="float32", quantization="gguf", skip_tokenizer_init=True)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="quantization='gguf' needs a GGUF file"):
        make_llm(folder, dtype="float32", quantization="gguf", skip_tokenizer_init=True)


def test_unknown_quantization_names_the_choices():
    from tokenmill.config import EngineConfig

    with pytest.raises(ValueError, match="quantization 'q4' is not supported; "
                                         "choose one of int8, int4, gptq, gguf, none"):
        EngineConfig(model="tiny-llama", quantization="q4")


def test_blocks_split_over_tensor_parallel_ranks_like_one_process(tmp_path, make_llm):
    """Column-parallel layers take their rows' codes and scales, row-parallel ones whole blocks of their
    inputs (o_proj: 32 of 64 per rank); down_proj's 48 inputs per rank (of 96) are not whole blocks, and the
    vocabulary-parallel head has padded rows: both load dequantized."""
    model = _hf_model("llama")
    path = tmp_path / "q4.gguf"
    _write(model, "llama", path, {"lm_head.weight": Q.Q8_0}, Q.Q4_0)
    llm = make_llm(path, dtype="float32", quantization="gguf", block_size=4, skip_tokenizer_init=True,
                   tensor_parallel_size=2)
    methods = _methods(llm)  # rank 0's model, in this process
    assert methods["model.layers.0.self_attn.o_proj"] == methods["model.layers.1.self_attn.qkv_proj"] == "gguf-q4_0"
    assert methods["model.layers.1.mlp.down_proj"] == methods["lm_head"] == "unquantized"
    greedy_steps_match(llm.engine.core, PROMPT, 5, _reference(path), label="tp=2")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    one = make_llm(path, dtype="float32", quantization="gguf", skip_tokenizer_init=True)
    assert _methods(one)["lm_head"] == "gguf-q8_0"
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, [1, 30], list(range(5, 40)))]
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)])


def test_offloaded_units_keep_their_blocks(tmp_path, make_llm):
    """Weights offloaded to disk as they load: the layers' codes and scales go with their units, and the
    tied head, which has nothing to load (its blocks come with its method), still completes its unit."""
    model = _tied_model()
    path = tmp_path / "tied.gguf"
    _write(model, "llama", path, {"model.embed_tokens.weight": Q.Q8_0}, Q.Q4_0, tied=True)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [{"prompt_token_ids": PROMPT}]
    expected = make_llm(path, dtype="bfloat16", skip_tokenizer_init=True).generate(prompt, params, use_tqdm=False)
    llm = make_llm(path, dtype="bfloat16", skip_tokenizer_init=True, offload_folder=tmp_path / "offload",
                   max_weight_memory=1)
    assert llm.engine.core.runner.model.weight_streamer.stats.num_units >= 2
    assert _methods(llm)["lm_head"] == "gguf-q8_0"
    assert (llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
            == expected[0].outputs[0].token_ids)
