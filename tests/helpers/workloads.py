"""Prompts and workloads shared by the tests that compare several processes with one."""

from __future__ import annotations

import random

from helpers.checkpoints import load_reference
from helpers.parity import greedy_steps_match
from tokenmill import SamplingParams

PROMPT = [1, 17, 45, 99, 3, 250, 77, 8, 9]


def tokens(outputs) -> list[list[int]]:
    """Every completion's token ids, request by request."""
    return [completion.token_ids for o in outputs for completion in o.outputs]


def mixed_workload(seed: int = 2) -> tuple[list[dict], list[SamplingParams]]:
    """Prompts sharing a prefix, longer ones, greedy, seeded sampling and beam search (with n=2)."""
    rng = random.Random(seed)
    shared = [1] + [rng.randrange(3, 380) for _ in range(24)]  # a prefix several prompts share
    prompts = [shared + [rng.randrange(3, 380) for _ in range(rng.randint(1, 12))] for _ in range(4)]
    prompts += [[1] + [rng.randrange(3, 380) for _ in range(rng.randint(20, 45))] for _ in range(2)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 4
    params += [SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
               SamplingParams(beam_width=3, n=2, max_tokens=8)]
    return [{"prompt_token_ids": p} for p in prompts], params


def matches_reference_and_one_process(llm, folder, make_llm, reference=None, label: str = "") -> None:
    """``llm`` (over several processes): logits within 1e-4 of transformers' (or ``reference``'s) step by step,
    and greedy tokens equal to one process's."""
    greedy_steps_match(llm.engine.core, PROMPT, 5, reference or load_reference(folder), label=label)
    prompts = [{"prompt_token_ids": p} for p in (PROMPT, [1, 300], [1] + list(range(5, 40)))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    one = make_llm(folder, dtype="float32")
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == tokens(one.generate(prompts, params,
                                                                                        use_tqdm=False))
