"""Sampler and its logits processors against the transformers logits warpers and hand computation."""

from __future__ import annotations

import pytest
import torch

from tokenmill.sample.sampler import (Sampler, SamplingMetadata, apply_min_p, apply_top_k_top_p,
                                      exponential_noise)


def _logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = _logits()
    ours = apply_top_k_top_p(logits, torch.full((4,), k), None)
    theirs = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = _logits()
    ours = apply_top_k_top_p(logits, None, torch.full((4,), p))
    theirs = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = _logits()
    ours = apply_min_p(logits, torch.full((4,), 0.1))
    theirs = MinPLogitsWarper(min_p=0.1)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_per_row_settings_differ():
    logits = _logits(rows=2)
    out = apply_top_k_top_p(logits, torch.tensor([1, 0]), torch.tensor([1.0, 0.5]))
    assert (~torch.isinf(out[0])).sum() == 1
    assert 1 <= (~torch.isinf(out[1])).sum() < 50


def _md(temps, seeds, **kw):
    return SamplingMetadata(temperature=torch.tensor(temps, dtype=torch.float32), top_k=kw.get("top_k"),
                            top_p=kw.get("top_p"), min_p=kw.get("min_p"), step_seeds=seeds)


def test_greedy_rows_take_argmax_and_random_rows_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]]))
    sampler = Sampler()
    counts = torch.zeros(3)
    for i in range(3000):
        tokens = sampler(logits, _md([0.0, 1.0], [0, i])).token_ids
        assert tokens[0] == 2
        counts[tokens[1]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_same_seed_same_token_regardless_of_row():
    logits = _logits(rows=3, vocab=1000)
    sampler = Sampler()
    a = sampler(logits, _md([1.0, 1.0, 1.0], [11, 22, 33])).token_ids
    b = sampler(logits[[2, 0]], _md([1.0, 1.0], [33, 11])).token_ids
    assert a[2] == b[0] and a[0] == b[1]
    noise = exponential_noise([5, 5], 10, torch.device("cpu"))
    assert torch.equal(noise[0], noise[1])


def test_banned_tokens_are_never_sampled():
    logits = torch.zeros(1, 4)
    logits[0, 2] = 10.0
    md = _md([0.0], None)
    md.banned_rows, md.banned_cols = torch.tensor([0]), torch.tensor([2])
    assert Sampler()(logits, md).token_ids.item() != 2


@pytest.mark.parametrize("name, settings", [
    ("temperature", {"temperature": 0.7}),
    ("top_k", {"temperature": 1.0, "top_k": 4}),
    ("top_p", {"temperature": 1.2, "top_p": 0.8}),
    ("min_p", {"temperature": 1.0, "min_p": 0.08}),
])
def test_sampled_frequencies_match_processed_distribution(name, settings):
    """Chi-square goodness of fit, fixed seeds (deterministic): samples follow the distribution the
    transformers warpers produce, and tokens they remove are never drawn."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    vocab, draws = 12, 20000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(42)) * 1.5
    expected = logits.clone()
    t = settings["temperature"]
    expected = TemperatureLogitsWarper(t)(None, expected)
    if "top_k" in settings:
        expected = TopKLogitsWarper(settings["top_k"])(None, expected)
    if "top_p" in settings:
        expected = TopPLogitsWarper(settings["top_p"])(None, expected)
    if "min_p" in settings:
        expected = MinPLogitsWarper(settings["min_p"])(None, expected)
    probs = expected.softmax(-1)[0]

    md = SamplingMetadata(
        temperature=torch.full((draws,), t),
        top_k=torch.full((draws,), settings["top_k"]) if "top_k" in settings else None,
        top_p=torch.full((draws,), settings["top_p"]) if "top_p" in settings else None,
        min_p=torch.full((draws,), settings["min_p"]) if "min_p" in settings else None,
        step_seeds=list(range(1000, 1000 + draws)))
    tokens = Sampler()(logits.expand(draws, vocab).contiguous(), md).token_ids
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"{name}: a removed token was sampled"
    expected_counts = probs[support].double() * draws
    chi2 = float(((counts[support] - expected_counts) ** 2 / expected_counts).sum())
    df = int(support.sum()) - 1
    # Critical value at p = 0.001 (Wilson-Hilferty approximation of the chi-square quantile).
    z = 3.090
    critical = df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    assert chi2 < critical, f"{name}: chi2 {chi2:.1f} >= {critical:.1f} (df {df})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 17, 32001, 49152])
def test_the_cpu_greedy_kernel_picks_what_max_picks(dtype, vocab):
    """The first maximum on ties, the first NaN where there is one, index 0 of an all -inf row, an inf
    row's first inf: the C++ kernel and the sampler's greedy path equal ``Tensor.max(-1).indices``."""
    from tokenmill.kernels import cpu_kernels
    from tokenmill.sample.sampler import greedy_argmax

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the C++ CPU kernels could not be built here")
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(8, vocab, generator=generator) * 3).round()  # many ties
    logits[1, vocab // 2], logits[1, -1] = float("nan"), float("nan")
    logits[2] = float("-inf")
    logits[3] = float("inf")
    logits[4, -1] = 1e4  # the maximum in the tail, past the last whole vector
    logits = logits.to(dtype)
    expected = logits.max(-1).indices
    assert torch.equal(kernels.greedy_argmax(logits), expected)
    assert torch.equal(greedy_argmax(logits), expected)
    assert torch.equal(greedy_argmax(logits[:, :vocab - 1 or 1]), logits[:, :vocab - 1 or 1].max(-1).indices)
