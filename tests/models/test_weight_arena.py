"""Weights gathered onto huge pages (models/weight_arena.py): same outputs, one advised region."""

import pytest
import torch

from tokenmill.layers.linear import Linear
from tokenmill.llm import LLM
from tokenmill.models import weight_arena
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not weight_arena.huge_pages_supported(),
                                reason="no transparent huge pages on this system (not Linux, or THP is 'never')")

PROMPT = {"prompt_token_ids": [1, 17, 200, 33, 401, 5, 77, 310]}
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)


def _run(monkeypatch, gather: bool, quantization):
    monkeypatch.setenv("TOKENMILL_NO_HUGE_PAGES", "0" if gather else "1")
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 0)  # the tiny model's ~0.2 MB too
    llm = LLM("tiny-llama", dtype="bfloat16", device="cpu", kv_cache_memory="1MiB", quantization=quantization)
    out = llm.generate(PROMPT, PARAMS, use_tqdm=False)[0]
    return llm.engine.core.runner.model, out


def _weights(model):
    for module in model.modules():
        if isinstance(module, Linear):
            qmatrix = getattr(module, "qmatrix", None)
            if qmatrix is not None:
                yield qmatrix.codes
            else:
                yield module.packed_weight if module.packed_weight is not None else module.weight


def _advised_regions():
    """(start, end) of each mapping in this process advised MADV_HUGEPAGE (VmFlags 'hg')."""
    regions, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                current = (start, end)
            elif head == "VmFlags:" and "hg" in line.split()[1:]:
                regions.append(current)
    return regions


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_gathered_weights_give_the_same_outputs_from_one_advised_region(monkeypatch, quantization):
    _, plain = _run(monkeypatch, False, quantization)
    model, gathered = _run(monkeypatch, True, quantization)
    assert gathered.outputs[0].token_ids == plain.outputs[0].token_ids
    assert gathered.outputs[0].logprobs == plain.outputs[0].logprobs
    assert gathered.prompt_logprobs == plain.prompt_logprobs

    ptrs = [w.data_ptr() for w in _weights(model)]
    start = min(ptrs)
    assert start % weight_arena.HUGE_PAGE == 0, "the region starts on a huge page"
    assert ptrs == sorted(ptrs), "laid out in the order a forward pass reads them"
    assert all(p % weight_arena.ALIGNMENT == 0 for p in ptrs)
    region = [r for r in _advised_regions() if r[0] <= start < r[1]]
    assert region and all(region[0][0] <= p < region[0][1] for p in ptrs), "every weight in one MADV_HUGEPAGE mapping"


def test_switched_off_or_too_small_nothing_moves(monkeypatch):
    # (Other libraries advise huge pages too, numpy among them, and malloc may reuse such memory: so what
    # is checked here is that nothing moves, not where the weights happen to sit.)
    model, _ = _run(monkeypatch, False, None)
    ptrs = [w.data_ptr() for w in _weights(model)]
    assert weight_arena.gather_weights(model) == 0  # TOKENMILL_NO_HUGE_PAGES=1
    monkeypatch.setenv("TOKENMILL_NO_HUGE_PAGES", "0")
    monkeypatch.setattr(weight_arena, "MIN_BYTES", weight_arena.HUGE_PAGE)
    assert weight_arena.gather_weights(model) == 0  # ~0.2 MB of weights: not worth a huge page
    assert [w.data_ptr() for w in _weights(model)] == ptrs
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 0)
    before = [w.clone() for w in _weights(model)]
    assert weight_arena.gather_weights(model) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model)))
    assert all(p != q for p, q in zip(ptrs, (w.data_ptr() for w in _weights(model))))


def test_holders_of_one_storage_keep_sharing_it(monkeypatch):
    """A Parameter shared by two layers (tied weights) moves once; two buffers over one storage (here of
    different shapes) move to one place in the region, each keeping its shape."""
    from tokenmill.layers.norm import RMSNorm

    monkeypatch.delenv("TOKENMILL_NO_HUGE_PAGES", raising=False)
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 0)
    model = torch.nn.Sequential(RMSNorm(64, 1e-6), RMSNorm(64, 1e-6))
    model[1].weight = model[0].weight  # tied
    table = torch.arange(64.0)
    model[0].register_buffer("table", table)
    model[1].register_buffer("table", table.view(8, 8))
    assert weight_arena.gather_weights(model) > 0
    assert model[1].weight is model[0].weight
    assert model[0].table.data_ptr() == model[1].table.data_ptr() and model[1].table.shape == (8, 8)
    assert torch.equal(model[0].table, torch.arange(64.0))
    assert any(r[0] <= model[0].weight.data_ptr() < r[1] for r in _advised_regions())
    assert weight_arena.gather_weights(torch.nn.Sequential()) == 0  # nothing to move
