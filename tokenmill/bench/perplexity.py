"""``tokenmill bench perplexity``: how well a model predicts a text, exp(mean negative log-likelihood)
over its tokens, each scored given the ones before it (in windows of the model's context).

The default text was written for this project, so no model has seen it in training; it is the
reference that quantized variants of a model are compared against.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tokenmill.bench.report import print_table, write_json
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

HELD_OUT_TEXT = """\
The lighthouse keeper on the northern island kept a notebook for every winter he spent there. In the
first one he wrote mostly about the weather: the wind that came from the east for nine days, the fog
that hid the mainland, the morning the sea froze near the rocks for the first time in twenty years.
Later notebooks changed. He began to write down the names of the ships that passed, the colour of
their hulls, and the hour at which their lights appeared on the horizon. By the fifth winter he knew
most of them by the sound of their engines.

When the keeper retired, the notebooks were given to the small museum in the harbour town. A student
who volunteered there one summer read all of them in a week. She noticed that the handwriting grew
smaller every year, as if the keeper had wanted to fit more of the season onto each page. She also
noticed that he never once complained about being alone. Instead he described the birds that rested
on the railing, the way the lamp hummed before a storm, and the letters his sister sent every month.

The museum now shows a single page from each notebook in a glass case near the door. Visitors often
stop at the last one, which is almost empty. It says only that the new automatic lamp had been
installed, that it worked well, and that the keeper would take the morning boat to the mainland. At
the bottom of the page, in very small letters, he had added that the sea looked calm.

Engineers who maintain such lamps today rarely visit the islands. Sensors report the state of the
light, the battery and the weather to an office on the coast, and a repair crew travels out only
when something fails. The work is safer and cheaper than before, but some of the older crew members
say they miss the quiet of the long watches, and the feeling of being responsible for every ship
that passed in the dark.
"""


def perplexity(llm: LLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, tokens scored): every token after the first of each ``window``-token window is
    scored given the tokens before it in its window (windows do not overlap)."""
    chunks = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    chunks = [c for c in chunks if len(c) > 1]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    total, count = 0.0, 0
    for chunk, out in zip(chunks, outputs):
        for token, entry in zip(chunk[1:], out.prompt_logprobs[1:]):
            total -= entry[token]
            count += 1
    return math.exp(total / count), count


def run_perplexity(llm: LLM, args) -> dict[str, Any]:
    text = Path(args.text).read_text() if args.text else HELD_OUT_TEXT
    if llm.tokenizer is None:
        raise ValueError("perplexity needs the model's tokenizer")
    token_ids = llm.tokenizer.encode(text)
    window = min(args.window or llm.engine.core.max_model_len - 1, llm.engine.core.max_model_len - 1)
    start = time.perf_counter()
    ppl, count = perplexity(llm, token_ids, window)
    elapsed = time.perf_counter() - start
    dtype = str(next(llm.engine.core.runner.model.parameters()).dtype)
    result = {"model": args.model, "dtype": dtype, "text": args.text or "built-in held-out text",
              "tokens_scored": count, "window": window, "perplexity": ppl, "elapsed_s": elapsed}
    print_table(f"perplexity: {args.model} ({dtype})", [
        ("text", result["text"]), ("tokens scored", count), ("window (tokens)", window), ("perplexity", ppl),
        ("elapsed (s)", elapsed)])
    write_json(args.output_json, result)
    return result
