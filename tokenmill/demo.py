"""``tokenmill demo``: the embedded default, SmolLM2-135M-Instruct (a real model, fetched once).

It streams a chat answer, then runs a mixed batch of chat requests (greedy and sampled, with
different settings) through the continuous batch and reports the timings.

Where the model cannot be fetched (offline, or ``TOKENMILL_NO_DOWNLOAD=1``), it says so and falls
back to a small Llama-shaped model with RANDOM weights (seed 0) and its own byte-level BPE
tokenizer trained on the text below, built once as a real Hugging Face folder: the engine at work,
its text gibberish.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from tokenmill.config import ModelConfig
from tokenmill.models.fetch import cache_root

CORPUS = """\
tokenmill is an inference engine. It runs prompts through a model, one step at a time.
The prefill phase reads the whole prompt in parallel and fills the KV cache.
The decode phase makes one token per step and reads the KV cache.
A paged KV cache keeps keys and values in fixed-size blocks, so memory is not wasted.
Continuous batching lets new requests join the batch while others are still decoding.
Prefix caching lets requests that share a prompt prefix share its blocks.
Once upon a time there was a little model that wanted to write stories.
It counted tokens, it sampled words, and it learned to stop at the right time.
"""

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "float32",
}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def default_cache_dir() -> Path:
    return cache_root() / "demo-llama-v1"


def build_demo_model(folder: Path) -> Path:
    """Writes the demo model folder if it is not there yet; returns it."""
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tokenmill.models.loader import build_model, random_weights

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, indent=2))
    hf_config = {**DEMO_CONFIG, "vocab_size": tok.get_vocab_size()}
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    model = build_model(ModelConfig.from_hf(hf_config), torch.float32, torch.device("cpu"))
    random_weights(model, seed=0, std=0.05)
    save_file(_hf_state_dict(model), str(tmp / "model.safetensors"))
    tmp.rename(folder)
    return folder


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our merged q/k/v and gate/up parameters split back into Hugging Face tensor names."""
    out = {}
    for name, param in model.named_parameters():
        if ".qkv_proj." in name:
            q, k, v = param.split(model.model.layers[0].self_attn.sizes)
            for part, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[name.replace("qkv_proj", part)] = tensor.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = param.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            out[name] = param.detach().contiguous()
    return out


QUESTIONS = [
    "What is the capital of France?", "Give me three tips for writing clear code.",
    "Explain what a KV cache is in one sentence.", "Write a haiku about the sea.",
    "What is 12 times 7?", "Name three planets of the solar system.",
    "Why is the sky blue? Answer briefly.", "Translate 'good morning' into Spanish.",
    "Suggest a name for a friendly robot.", "What does a compiler do?",
    "List two benefits of exercise.", "Who wrote Romeo and Juliet?",
]


def run_demo(cache_dir: Path | None = None) -> None:
    from tokenmill import LLM
    from tokenmill.errors import ModelLoadError
    from tokenmill.models.fetch import resolve_model

    try:
        model = resolve_model("smollm2-135m-instruct")
    except ModelLoadError as e:
        print(f"NOTE: the real default model could not be fetched ({e}).")
        return _run_random_demo(cache_dir)
    print(f"demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, {model})\n")
    llm = LLM(model, kv_cache_memory="256MiB", max_num_batched_tokens=1024)
    _stream_chat(llm, "What is paged attention? Answer in two sentences.")
    _mixed_batch(llm, [[{"role": "user", "content": q}] for q in QUESTIONS], shown=4)


def _stream_chat(llm, question: str) -> None:
    from tokenmill import SamplingParams

    print(f"user: {question}\nassistant: ", end="", flush=True)
    engine = llm.engine
    engine.add_request(engine.encode_chat([{"role": "user", "content": question}]),
                       SamplingParams(temperature=0.0, max_tokens=96, repetition_penalty=1.1))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.outputs[0].delta_text, end="", flush=True)
            final = out
    print(f"\n[{len(final.outputs[0].token_ids)} tokens, TTFT {1000 * final.time_to_first_token:.0f} ms, "
          f"{1000 * final.time_per_output_token:.1f} ms/token]\n")


def _demo_params(i: int, max_tokens: int):
    from tokenmill import SamplingParams

    if i % 4 == 0:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if i % 4 == 1:
        return SamplingParams(temperature=0.8, top_p=0.9, max_tokens=max_tokens, seed=i)
    if i % 4 == 2:
        return SamplingParams(temperature=1.0, top_k=20, max_tokens=max_tokens, seed=i)
    return SamplingParams(temperature=0.7, min_p=0.05, max_tokens=max_tokens, seed=i, stop=["\n\n"])


def _mixed_batch(llm, prompts: list, shown: int, chat: bool = True, max_tokens: int = 64) -> None:
    """Every prompt at once through the continuous batch, each with its own sampling settings."""
    params = [_demo_params(i, max_tokens) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.chat(prompts, params) if chat else llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    print(f"a mixed batch of {len(prompts)} requests, all at once:")
    for prompt, out, p in list(zip(prompts, outputs, params))[:shown]:
        text = prompt[-1]["content"] if chat else prompt
        setting = "greedy" if p.greedy else f"T={p.temperature}"
        print(f"  {text!r} [{setting}] -> {out.outputs[0].text.strip()!r} "
              f"({len(out.outputs[0].token_ids)} tokens, finish={out.outputs[0].finish_reason})")
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = statistics.fmean(o.time_to_first_token for o in outputs)
    tpot = statistics.fmean(t for o in outputs if (t := o.time_per_output_token) is not None)
    core = llm.engine.core
    print(f"\n{len(outputs)} requests, {num_out} output tokens in {elapsed:.2f} s: "
          f"{num_out / elapsed:.0f} output tokens/s; mean TTFT {1000 * ttft:.1f} ms, mean TPOT {1000 * tpot:.1f} ms; "
          f"prefix-cache hit rate {core.kv_cache_manager.prefix_cache_hit_rate:.0%}")
    core.check_integrity()
    print(f"KV blocks free after the batch: {core.kv_cache_manager.num_free_blocks}/{core.num_blocks}")


def _run_random_demo(cache_dir: Path | None) -> None:
    from tokenmill import LLM

    folder = build_demo_model(cache_dir or default_cache_dir())
    print(f"demo model: {folder}")
    print("NOTE: its weights are RANDOM (seed 0), so the text is gibberish; the point is the engine at work.\n")
    llm = LLM(str(folder), kv_cache_memory="64MiB", max_num_batched_tokens=512)
    shared = "The prefill phase reads the whole prompt in parallel and fills the KV cache. "
    lines = CORPUS.splitlines()
    prompts = [shared + lines[i % 8] if i % 2 else lines[i % 8] for i in range(24)]
    _mixed_batch(llm, prompts, shown=4, chat=False, max_tokens=48)
