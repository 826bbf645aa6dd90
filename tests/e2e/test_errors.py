"""Bad input gets a specific exception naming the problem, never a hang or a crash deep inside."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenmill import LLM, ModelLoadError, RequestError, SamplingParams, TokenizerError


def _copy(checkpoint, tmp_path):
    """A private copy of the tiny llama checkpoint, to break."""
    folder = tmp_path / "m"
    shutil.copytree(checkpoint("llama"), folder)
    return folder


def test_missing_folder():
    with pytest.raises(ModelLoadError, match="not found"):
        LLM("/nonexistent/model/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    cfg["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"FalconForCausalLM is not supported; supported: .*LlamaForCausalLM"):
        LLM(str(folder))


def test_missing_weights_file(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(str(folder))


def test_truncated_weights_file(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*truncated"):
        LLM(str(folder))


def test_checkpoint_missing_a_tensor(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"lacks 1 weight.*gate_up_proj.weight\[1\]"):
        LLM(str(folder))


def test_truncated_llama2c_checkpoint(tmp_path):
    from helpers.shared_models import stories_dir

    data = (stories_dir() / "stories260K.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:50_000])
    with pytest.raises(ModelLoadError, match="truncated llama2.c checkpoint"):
        LLM(str(tmp_path / "cut.bin"), tokenizer=str(stories_dir() / "tok512.bin"))


def test_missing_tokenizer(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        LLM(str(folder))


def test_prompt_over_max_model_len(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), max_model_len=64)
    with pytest.raises(RequestError, match="prompt has 80 tokens; max_model_len is 64"):
        llm.generate({"prompt_token_ids": [1] * 80}, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\) = 70 exceeds max_model_len 64"):
        llm.generate({"prompt_token_ids": [1] * 60}, SamplingParams(max_tokens=10))
    # A good prompt in the same call as a bad one: the call fails and nothing stays queued.
    with pytest.raises(RequestError):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [1] * 80}])
    out = llm.generate({"prompt_token_ids": [1, 5]}, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 62 and out.outputs[0].finish_reason == "length"


def test_bad_prompts(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"))
    with pytest.raises(RequestError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(RequestError, match="token id 100000 is outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 100000]})
    with pytest.raises(RequestError, match="a prompt is a string or"):
        llm.generate([12345])
    with pytest.raises(RequestError, match="got 2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])


def test_request_larger_than_kv_cache(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), kv_cache_memory=4 * 2 * 2 * 2 * 8 * 4 * 16)  # 4 blocks of 16 tokens
    with pytest.raises(RequestError, match="needs up to 7 KV blocks but the cache has 4"):
        llm.generate({"prompt_token_ids": [1] * 100}, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match=r"needs up to 6 KV blocks \(3 beams\) but the cache has 4"):
        llm.generate({"prompt_token_ids": [1] * 20}, SamplingParams(max_tokens=4, beam_width=3))


def test_beam_width_beyond_max_num_seqs(checkpoint, make_llm):
    llm = make_llm(checkpoint("llama"), max_num_seqs=4)
    with pytest.raises(RequestError, match="beam_width 5 exceeds max_num_seqs 4"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(beam_width=5))


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be >= 0.0, got -0.5"),
    ({"top_p": 0.0}, r"top_p must be in \(0.0, 1.0\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0.0, 1.0\]"),
    ({"top_k": -3}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"min_p": 2}, r"min_p must be in \[0.0, 1.0\]"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"min_tokens": 5, "max_tokens": 2}, r"min_tokens \(5\) must not exceed max_tokens \(2\)"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be non-negative"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"beam_width": 0}, r"beam_width must be an integer in \[1, 128\]"),
    ({"beam_width": 2.0}, "beam_width must be an integer"),
    ({"beam_width": 2, "n": 3}, r"n \(3\) must not exceed beam_width \(2\)"),
    ({"beam_width": 2, "best_of": 2}, "best_of does not apply to beam search"),
    ({"beam_width": 2, "temperature": 0.7}, "beam search is deterministic"),
    ({"beam_width": 2, "top_k": 5}, "top_k does not apply to beam search"),
    ({"beam_width": 2, "stop": ["x"]}, "stop strings are not supported with beam search"),
    ({"beam_width": 2, "logprobs": 1}, "logprobs and prompt_logprobs are not supported with beam search"),
    ({"length_penalty": "long"}, "length_penalty must be a number"),
    ({"early_stopping": "sometimes"}, "early_stopping must be true, false or \"never\""),
])
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int3"}, "dtype 'int3' is not supported"),
    ({"kv_cache_memory": "lots"}, "not a size"),
    ({"block_size": 12}, "block_size must be a positive power of two"),
    ({"max_model_len": 100000}, "exceeds the model's context length 256"),
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"device": "tpu"}, "device 'tpu' is not supported"),
])
def test_invalid_engine_options(checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(checkpoint("llama")), **kwargs)


def test_default_kv_cache_is_sized_by_what_the_model_can_use(caplog):
    """Not 4 GiB for a 260K-parameter model with a 512-token context: max_num_seqs sequences of
    max_model_len tokens (here 8 x 32 blocks of 16), and start-up says so."""
    import logging

    from helpers.shared_models import stories_dir

    folder = stories_dir()
    logging.getLogger("tokenmill").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="tokenmill"):
            llm = LLM(str(folder / "stories260K.bin"), tokenizer=str(folder / "tok512.bin"), max_num_seqs=8,
                      device="cpu")
    finally:
        logging.getLogger("tokenmill").propagate = False
    assert llm.engine.core.num_blocks == 8 * 512 // 16
    assert "max_num_seqs 8 x max_model_len 512" in caplog.text


def test_empty_prompts_follow_one_rule(checkpoint):
    """An empty string is text like any other (BOS alone with this tokenizer); an empty id list is refused."""
    llm = LLM(str(checkpoint("llama")), kv_cache_memory="8MiB", device="cpu")
    out = llm.generate([""], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    assert out.prompt_token_ids == [1] and len(out.outputs[0].token_ids) == 3
    with pytest.raises(RequestError, match="the prompt is empty"):
        llm.generate({"prompt_token_ids": []}, SamplingParams(max_tokens=3))
    with pytest.raises(RequestError, match="prompt is too long"):
        llm.generate("x" * 100_000, SamplingParams(max_tokens=3))


def test_a_top_k_beyond_any_integer_width_means_all_tokens(checkpoint, make_llm):
    """top_k = 10**31 (the server's fuzzer sent one) once overflowed the int64 tensor of the batch and
    killed the engine; a top_k past the vocabulary keeps every token, as top_k = vocabulary does."""
    llm = make_llm(checkpoint("llama"), dtype="float32")
    prompt = {"prompt_token_ids": [1, 5, 9]}
    huge = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=10**31, seed=3, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    full = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=0, seed=3, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    assert huge[0].outputs[0].token_ids == full[0].outputs[0].token_ids
