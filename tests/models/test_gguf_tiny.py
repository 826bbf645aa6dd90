"""Tiny GGUF files written here with the gguf writer, for each architecture and tensor type:
our dequantization against one written independently below, and our logits against
transformers loading the same file (gguf_file=...)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from helpers.parity import greedy_steps_match  # noqa: E402
from helpers.text_samples import mixed_strings  # noqa: E402
from tokenmill import SamplingParams  # noqa: E402

VOCAB = 96
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _hf_model(arch: str):
    """A tiny random transformers model whose matrices are all 32 wide (the quantization block)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    config, cls = {"llama": (LlamaConfig(rope_theta=10000.0, **common), LlamaForCausalLM),
                   "qwen2": (Qwen2Config(rope_theta=1e6, **common), Qwen2ForCausalLM),
                   # transformers' GGUF loading ignores qwen3.attention.key_length and assumes Qwen3's
                   # default head_dim of 128 (as the real models have); ours reads it.
                   "qwen3": (Qwen3Config(rope_theta=1e6, head_dim=128, **common), Qwen3ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norms away from 1, biases non-zero: both must be read, not defaulted
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand_like(param) + (0.5 if name.endswith("norm.weight") else -0.5))
    return model


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama Q/K rows: each head's halves interleaved in pairs."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, rest = hf_name.split(".", 3)
        part, _, suffix = rest.rpartition(".")
        return f"blk.{layer}.{_LAYER[part]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf_name]


def write_gguf(model, arch: str, qtype: Q, path) -> dict[str, np.ndarray]:
    """The model as a GGUF file, 2-D tensors in ``qtype``; returns each tensor's stored bytes (or values)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(int(qtype) if qtype != Q.F32 else 0)
    stored = {}
    for name, param in model.state_dict().items():
        values = param.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            values = _llama_cpp_permute(values, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        if values.ndim == 2 and qtype not in (Q.F32, Q.F16):
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
        elif values.ndim == 2 and qtype == Q.F16:
            data = values.astype(np.float16)
            writer.add_tensor(_gguf_name(name), data)
        else:
            data = values
            writer.add_tensor(_gguf_name(name), data)
        stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def independent_dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    """The block formats, spelled out: Q8_0 (f16 d, 32 int8), Q4_0 (f16 d, 32 nibbles - 8), Q4_1
    (f16 d, f16 m, 32 nibbles), nibbles low halves first; BF16 the top 16 bits of a float32."""
    blocks = data.reshape(-1, data.shape[-1] * shape[0] // (shape[0] * shape[1] // 32))  # (num_blocks, bytes)
    if qtype == Q.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (num_blocks, 1)
    if qtype == Q.Q8_0:
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if qtype == Q.Q4_0:
        nibbles = blocks[:, 2:]
        q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1).astype(np.float32) - 8
        return (d * q).reshape(shape)
    if qtype == Q.Q4_1:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        nibbles = blocks[:, 4:]
        q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    raise AssertionError(qtype)


QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantization_matches_the_block_format(qtype, tmp_path):
    from tokenmill.models.gguf import dequantize, open_gguf

    model = _hf_model("qwen2")
    stored = write_gguf(model, "qwen2", qtype, tmp_path / "m.gguf")
    tensors = {t.name: t for t in open_gguf(tmp_path / "m.gguf").tensors}
    for name, param in model.state_dict().items():
        ours = dequantize(tensors[_gguf_name(name)]).numpy()
        if param.dim() == 2 and qtype not in (Q.F32, Q.F16):
            expected = independent_dequantize(stored[name], qtype, tuple(param.shape))
        else:
            expected = stored[name].astype(np.float32)
        np.testing.assert_array_equal(ours, expected, err_msg=name)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers_on_the_same_file(arch, qtype, tmp_path, make_llm):
    from transformers import AutoModelForCausalLM

    model = _hf_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(model, arch, qtype, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    llm = make_llm(path, dtype="float32", block_size=4, skip_tokenizer_init=True)
    references = (ref, model) if qtype == Q.F32 else (ref,)  # an F32 file is the original model itself
    greedy_steps_match(llm.engine.core, [1, 17, 45, 60, 3, 25, 77, 12, 9], 8, *references, label=f"{arch} {qtype.name}")


def _f16(raw: np.ndarray) -> float:
    return float(raw[:2].copy().view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """The 6-bit scale and min of sub-block j from the 12 packed bytes of a Q4_K/Q5_K block."""
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)


def k_quant_block(block: np.ndarray, qtype: Q) -> list[float]:
    """One 256-value K-quant block, element by element as llama.cpp's reference dequantizers read it."""
    out = []
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin, scales = _f16(block[0:2]), _f16(block[2:4]), block[4:16]
        qh = block[16:48] if qtype == Q.Q5_K else None
        qs = block[48:176] if qtype == Q.Q5_K else block[16:144]
        for group in range(4):  # 64 values each: low nibbles with sub-block 2g, high with 2g + 1
            for half in range(2):
                scale, minimum = _scale_min_k4(2 * group + half, scales)
                for l in range(32):
                    q = (int(qs[32 * group + l]) >> (4 * half)) & 0xF
                    if qh is not None:
                        q += 16 if int(qh[l]) & (1 << (2 * group + half)) else 0
                    out.append(d * scale * q - dmin * minimum)
        return out
    assert qtype == Q.Q6_K
    ql, qh, scales, d = block[0:128], block[128:192], block[192:208].view(np.int8), _f16(block[208:210])
    values = [0.0] * 256
    for n in range(2):  # 128 values each
        for l in range(32):
            low, high = ql[64 * n:64 * n + 64], qh[32 * n:32 * n + 32]
            quads = [(int(low[l]) & 0xF) | (((int(high[l]) >> 0) & 3) << 4),
                     (int(low[l + 32]) & 0xF) | (((int(high[l]) >> 2) & 3) << 4),
                     (int(low[l]) >> 4) | (((int(high[l]) >> 4) & 3) << 4),
                     (int(low[l + 32]) >> 4) | (((int(high[l]) >> 6) & 3) << 4)]
            for k, q in enumerate(quads):
                values[128 * n + 32 * k + l] = d * int(scales[8 * n + l // 16 + 2 * k]) * (q - 32)
    return values


@pytest.mark.parametrize("qtype, block_bytes", [(Q.Q4_K, 144), (Q.Q5_K, 176), (Q.Q6_K, 210)], ids=lambda x: str(x))
def test_k_quants_dequantize_as_the_reference_reads_them(qtype, block_bytes, tmp_path):
    """Random K-quant blocks (with sane half-precision scales) written to a file and read back."""
    from tokenmill.models.gguf import dequantize, open_gguf

    rng = np.random.default_rng(0)
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, block_bytes), dtype=np.uint8)
    scale_at = [0, 2] if qtype != Q.Q6_K else [208]
    for offset in scale_at:  # the f16 super-block scales: small finite numbers, not random bit patterns
        raw[:, :, offset:offset + 2] = rng.uniform(0.01, 0.1, size=(rows, blocks_per_row)).astype(
            np.float16)[..., None].view(np.uint8)
    raw = raw.reshape(rows, blocks_per_row * block_bytes)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = open_gguf(tmp_path / "k.gguf").tensors[0]
    ours = dequantize(tensor).numpy()
    assert ours.shape == (rows, 256 * blocks_per_row)
    expected = np.array([[v for b in range(blocks_per_row) for v in k_quant_block(
        raw[r, b * block_bytes:(b + 1) * block_bytes], qtype)] for r in range(rows)], dtype=np.float32)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


_GPT2 = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
         "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def write_gpt2_gguf(model, qtype: Q, path) -> None:
    """GPT-2 as llama.cpp's converter writes it: Conv1D (in, out) matrices stored as (out, in)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])  # transformers takes the vocabulary size from it
    for name, param in model.state_dict().items():
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied head; mask buffers
        values = param.float().numpy()
        parts = name.split(".")
        if parts[1] == "h":
            gguf_name = f"blk.{parts[2]}.{_GPT2['.'.join(parts[3:-1])]}.{parts[-1]}"
            values = values.T.copy() if values.ndim == 2 else values
        else:
            gguf_name = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}[parts[1]] + "." + parts[-1]
        if values.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gpt2_gguf_matches_transformers_on_the_same_file(qtype, tmp_path, make_llm):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # n_positions 1024: transformers' GGUF loading keeps GPT-2's default rather than gpt2.context_length.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                       bos_token_id=1, eos_token_id=2)).eval()
    write_gpt2_gguf(model, qtype, tmp_path / "gpt2.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="gpt2.gguf", dtype=torch.float32).eval()
    llm = make_llm(tmp_path / "gpt2.gguf", dtype="float32", skip_tokenizer_init=True)
    prompt = [1, 17, 45, 60, 3, 25, 77]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    core = llm.engine.core
    core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1))
    ours = core.runner.execute_logits(core.scheduler.schedule())["r"]
    core.abort_requests(["r"])
    with torch.no_grad():
        theirs = ref(torch.tensor([prompt])).logits[0]
        if qtype == Q.F32:
            torch.testing.assert_close(ours, model(torch.tensor([prompt])).logits[0], atol=1e-4, rtol=1e-4)
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert out.outputs[0].token_ids == expected


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """The Llama 2 tokenizer (../shared/models) written as a GGUF the way llama.cpp writes one:
    pieces, scores and token types, no merges (they are derived from the scores)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from helpers.shared_models import SHARED_MODELS
    from tokenmill.engine.tokenizer_loader import load_tokenizer

    model_file = SHARED_MODELS / "llama2-tokenizer" / "tokenizer.model"
    if not model_file.is_file():
        pytest.skip(f"the Llama 2 tokenizer is not at {model_file} (../shared/models is absent)")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    writer = gguf.GGUFWriter(str(tmp_path / "llama2-tok.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_tokenizer(tmp_path / "llama2-tok.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="llama2-tok.gguf")
    assert ours.vocab_size == len(reference)
    for text in mixed_strings(300, seed=1) + ["<s>", "</s>", " leading", "trailing ", "\n\nnewlines\n"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False), text


def _random_k_blocks(rows: int, cols: int, qtype: Q, rng) -> np.ndarray:
    """Random K-quant blocks (the Python gguf package cannot quantize to K-quants), with small
    half-precision super-block scales so that the weights stay in a sane range."""
    block_bytes = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in ([0, 2] if qtype != Q.Q6_K else [208]):
        scale = rng.uniform(0.00002, 0.0002, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, offset:offset + 2] = scale[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_model_matches_transformers(qtype, tmp_path, make_llm):
    """A llama file whose matrices are K-quant blocks (256 wide): the same logits as transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False))
    rng = np.random.default_rng(1)
    cfg = model.config
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    for name, param in model.state_dict().items():
        if param.dim() == 2:
            writer.add_tensor(_gguf_name(name), _random_k_blocks(*param.shape, qtype, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), param.float().numpy() + 0.5)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert cfg.vocab_size == VOCAB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", dtype=torch.float32).eval()
    llm = make_llm(tmp_path / "k.gguf", dtype="float32", skip_tokenizer_init=True)
    core = llm.engine.core
    prompt = [1, 17, 45, 60, 3, 25]
    core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=1))
    ours = core.runner.execute_logits(core.scheduler.schedule())["r"]
    core.abort_requests(["r"])
    with torch.no_grad():
        theirs = ref(torch.tensor([prompt])).logits[0]
    assert not ours.isnan().any(), "ours"
    assert not theirs.isnan().any(), "transformers"
    assert theirs.abs().max() > 1e-3  # the logits are not trivially zero
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
