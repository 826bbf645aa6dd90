"""Step-by-step logit parity: our engine against reference models (transformers), one step at a time."""

from __future__ import annotations

import torch

from tokenmill import SamplingParams
from tokenmill.outputs import ModelRunnerOutput


def greedy_steps_match(core, prompt: list[int], num_steps: int, *references, label: str = "",
                       tolerance: float = 1e-4) -> tuple[list[int], list[int]]:
    """Runs ``prompt`` greedily for ``num_steps`` engine steps (the first one prefills). At each step
    our logits at the new positions must equal every reference's, recomputed over the whole
    sequence, within ``tolerance``. Returns the tokens (prompt + generated) and how many positions
    each step computed."""
    core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=num_steps, ignore_eos=True))
    tokens, widths = list(prompt), []
    for step in range(num_steps):
        so = core.scheduler.schedule()
        ours = core.runner.execute_logits(so)["r"].cpu()  # (positions computed this step, V)
        widths.append(ours.shape[0])
        with torch.no_grad():
            for reference in references:
                theirs = reference(torch.tensor([tokens])).logits[0, -ours.shape[0]:]
                torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance, msg=lambda m: (
                    f"{label} step {step} ({'prefill' if step == 0 else 'decode'}): {m}"))
        token = int(ours[-1].argmax())
        tokens.append(token)
        core.scheduler.update_from_output(so, ModelRunnerOutput({"r": [token]}))
    return tokens, widths
