"""Incremental detokenisation that never emits broken UTF-8, with stop strings held back.

New text is the difference between decoding a short window of recent tokens with and without
the newest ones; while that difference ends in U+FFFD (a character whose bytes span tokens not
all seen yet) it is held back. Stop strings end the request and are cut from the text; while a
request runs, the last ``len(longest stop) - 1`` characters are held back too, since they could
be the start of a stop string that the next token completes.
"""

from __future__ import annotations

from tokenmill.engine.tokenizer import BaseTokenizer
from tokenmill.sampling_params import SamplingParams

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, so word boundaries come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: BaseTokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        """All output text decoded so far (stop string removed once found)."""
        self.num_emitted_chars = 0
        self.stop_string: str | None = None
        self.num_tokens_taken = 0
        """How many of the last ``update``'s tokens were read: all, or up to the one completing a stop string
        (a burst of several tokens, as multi-step decoding gives, may run past it)."""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, new_token_ids: list[int], finished: bool) -> str:
        """Feeds new tokens; returns the newly final text. Sets ``stop_string`` when one was found (the
        tokens after the one that completed it are not read: ``num_tokens_taken``)."""
        self.num_tokens_taken = 0
        for token in new_token_ids:
            self.num_tokens_taken += 1
            self.ids.append(token)
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._append(full[len(prefix):])
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop_string is not None:
                break
        if finished and self.stop_string is None and self.read_offset < len(self.ids):
            # Flush what is left, even an incomplete character: the request will produce no more.
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self._append(self._decode(self.ids[self.prefix_offset:])[len(prefix):])
            self.read_offset = len(self.ids)
        done = finished or self.stop_string is not None
        end = len(self.text) if done else max(self.num_emitted_chars, len(self.text) - self.hold_back)
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta

    def _append(self, new_text: str) -> None:
        if self.stop_string is not None:
            return
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += new_text
        found = [(index, stop) for stop in self.stop if (index := self.text.find(stop, search_from)) != -1]
        if found:
            index, self.stop_string = min(found)
            self.text = self.text[:index]
