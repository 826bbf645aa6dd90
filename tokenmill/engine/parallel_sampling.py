"""n > 1 and best_of: several samples of one prompt, run as child requests.

As in vLLM v1, the samples are independent child requests. The first prefills the prompt. The
others are admitted once its full blocks are in the prefix cache, so they share those blocks
(reference counts) instead of computing them again; only the prompt's partial last block is
per child. Child i is seeded from (seed, i), so a seeded request returns the same samples
whatever else is in the batch. With best_of, the n children with the highest cumulative
logprob are returned, best first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


def child_request_id(group_id: str, index: int) -> str:
    return f"{group_id}#{index}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    seed = None if params.seed is None else hash((params.seed, index)) % 2**63
    # best_of ranks by cumulative logprob, so every child reports at least its own token's logprob.
    logprobs = params.logprobs if params.best_of is None else (params.logprobs or 0)
    return dataclasses.replace(params, n=1, best_of=None, seed=seed, logprobs=logprobs)


@dataclass
class SampleGroup:
    request_id: str
    params: SamplingParams
    prompt: dict
    """The encoded prompt ({"prompt", "prompt_token_ids"}) every child is added with."""
    pending: list[int]
    """Child indices not yet added to the engine (waiting for the first child's prefill)."""
    outputs: dict[int, RequestOutput] = field(default_factory=dict)

    @property
    def num_children(self) -> int:
        return self.params.best_of or self.params.n

    @property
    def finished(self) -> bool:
        return not self.pending and len(self.outputs) == self.num_children and all(
            o.finished for o in self.outputs.values())

    def merged_output(self) -> RequestOutput:
        """One RequestOutput whose ``outputs`` are the samples (the best n when best_of is set)."""
        children = [self.outputs[i] for i in sorted(self.outputs)]
        completions = [dataclasses.replace(c.outputs[0], index=i) for i, c in zip(sorted(self.outputs), children)]
        if self.finished and self.params.best_of is not None:
            completions.sort(key=lambda c: c.cumulative_logprob, reverse=True)
            completions = completions[:self.params.n]
            if self.params.logprobs is None:  # computed for ranking only
                completions = [dataclasses.replace(c, logprobs=None) for c in completions]
            completions = [dataclasses.replace(c, index=i) for i, c in enumerate(completions)]
        first = children[0]
        return RequestOutput(self.request_id, first.prompt, first.prompt_token_ids, completions, self.finished,
                             first.metrics, first.num_cached_tokens, first.prompt_logprobs)

