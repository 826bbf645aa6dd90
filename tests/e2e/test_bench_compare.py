"""``tokenmill bench compare``: variants loaded together, timed in a rotating order, ratios within rounds."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from tokenmill.bench import compare
from tokenmill.bench.quality import parse_variant


def _args(model, tmp_path, variants, rounds=3) -> argparse.Namespace:
    return argparse.Namespace(model=str(model), variants=variants, rounds=rounds, input_len=8, output_len=4,
                              tokenizer=None, device="cpu", kv_cache_memory="8MiB", seed=0, num_scheduler_steps=1,
                              output_json=str(tmp_path / "compare.json"))


def test_rounds_rotate_and_speedups_are_taken_within_each_round(checkpoint, tmp_path, monkeypatch, capsys):
    """Fake clocks: round r runs variant r first, and each speed-up is baseline / variant of the same round."""
    variants = ["float32", "float32:int8", "float32:int4-g32"]
    llm_variant = {}  # the LLM each variant built, to name who is timed
    order = []
    ms = {"float32": [10.0, 12.0, 11.0], "float32:int8": [5.0, 8.0, 5.5], "float32:int4-g32": [4.0, 4.0, 4.0]}
    real_prepare = compare.prepare_request

    def prepare(llm, *a):
        llm_variant[id(llm)] = variants[len(llm_variant)]  # built in the order given
        return real_prepare(llm, *a)

    def fake_time(llm, prompt, params):
        variant = llm_variant[id(llm)]
        order.append(variant)
        return 0.0, ms[variant][sum(v == variant for v in order) - 1] / 1000

    monkeypatch.setattr(compare, "prepare_request", prepare)
    monkeypatch.setattr(compare, "time_request", fake_time)
    report = compare.run_compare(_args(checkpoint("llama3"), tmp_path, variants))
    assert order == [variants[0], variants[1], variants[2], variants[1], variants[2], variants[0],
                     variants[2], variants[0], variants[1]]
    by_name = {r["variant"]: r for r in report["results"]}
    assert [r["variant"] for r in report["results"]] == variants
    assert by_name["float32:int8"]["speedup_vs_first_rounds"] == pytest.approx([2.0, 1.5, 2.0])
    assert by_name["float32:int8"]["speedup_vs_first"] == pytest.approx(2.0)  # the median of the rounds' ratios
    assert by_name["float32:int4-g32"]["speedup_vs_first_rounds"] == pytest.approx([2.5, 3.0, 2.75])
    assert by_name["float32"]["speedup_vs_first"] == 1.0 and by_name["float32"]["tpot_ms"] == pytest.approx(11.0)
    # fewer bytes per token for fewer bits, and the JSON holds what the table shows
    reads = [by_name[v]["decode_read_bytes"] for v in variants]
    assert reads[0] > reads[1] > reads[2]
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["results"] == report["results"] and "machine" in data
    assert "float32:int4-g32" in capsys.readouterr().out


def test_a_variant_given_twice_is_two_engines_timed_apart(checkpoint, tmp_path, monkeypatch):
    """The same variant twice (an A/A control of the machine's noise) keeps two rows with their own times."""
    built = []
    real_prepare = compare.prepare_request

    def prepare(llm, *a):
        built.append(id(llm))
        return real_prepare(llm, *a)

    monkeypatch.setattr(compare, "prepare_request", prepare)
    monkeypatch.setattr(compare, "time_request", lambda llm, *_: (0.0, [0.010, 0.0125][built.index(id(llm))]))
    report = compare.run_compare(_args(checkpoint("llama3"), tmp_path, ["float32", "float32"], rounds=2))
    assert len(set(built)) == 2
    assert [r["tpot_ms_rounds"] for r in report["results"]] == [pytest.approx([10.0, 10.0]),
                                                                 pytest.approx([12.5, 12.5])]
    assert report["results"][1]["speedup_vs_first"] == pytest.approx(0.8)


def test_bad_variants_are_refused_before_any_model_loads(tmp_path):
    missing = tmp_path / "no-model"  # never opened: the variants are checked first
    with pytest.raises(ValueError, match="int3"):
        compare.run_compare(_args(missing, tmp_path, ["float32", "float32:int3"]))
    with pytest.raises(ValueError, match="at least two variants"):
        compare.run_compare(_args(missing, tmp_path, ["float32"]))
    with pytest.raises(ValueError, match="--rounds must be at least 1, got 0"):
        compare.run_compare(_args(missing, tmp_path, ["float32", "bfloat16"], rounds=0))
    with pytest.raises(ValueError, match="after '@' must be a positive integer, got '0'"):
        compare.run_compare(_args(missing, tmp_path, ["float32", "bfloat16@0"]))
    args = _args(missing, tmp_path, ["float32", "bfloat16"])
    args.num_scheduler_steps = 0
    with pytest.raises(ValueError, match="--num-scheduler-steps must be at least 1, got 0"):
        compare.run_compare(args)


def test_at_k_gives_a_variant_its_decode_steps_per_call():
    assert compare.split_steps("bfloat16:int4-g32@8", 1) == ("bfloat16:int4-g32", 8)
    assert compare.split_steps("bfloat16", 4) == ("bfloat16", 4)
    with pytest.raises(ValueError, match="'bfloat16@x'.* got 'x'"):
        compare.split_steps("bfloat16@x", 1)


def test_int4_alone_takes_the_default_group_size():
    assert parse_variant("bfloat16:int4") == ("bfloat16", {"quantization": "int4"}, None)
    assert parse_variant("float32:int4-g32")[1] == {"quantization": "int4", "quantization_group_size": 32}
    assert parse_variant("float32:int4-channel")[1] == {"quantization": "int4", "quantization_group_size": -1}
    with pytest.raises(ValueError, match=r"int4-gN .* got 'int4-gx'"):
        parse_variant("float32:int4-gx")


def test_command_line_runs_real_rounds(checkpoint, tmp_path):
    out = tmp_path / "cmp.json"
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill", "bench", "compare", str(checkpoint("llama3")), "--variants", "float32",
         "bfloat16:int8@4", "--rounds", "2", "--input-len", "8", "--output-len", "4", "--kv-cache-memory", "8MiB",
         "--threads", "1", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [len(r["tpot_ms_rounds"]) for r in data["results"]] == [2, 2]
    assert [r["num_scheduler_steps"] for r in data["results"]] == [1, 4]  # @4: four decode steps per call
    assert all(t > 0 for r in data["results"] for t in r["tpot_ms_rounds"])
    assert "vs first" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "tokenmill", "bench", "compare", str(checkpoint("llama3")),
                          "--variants", "float32", "float32:int3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "int3" in bad.stderr and "Traceback" not in bad.stderr
