"""Token ids -> text deltas, one token at a time, never emitting broken UTF-8 or half a stop.

`IncrementalDetokenizer` decodes a short window of recent tokens (vLLM's prefix/read offsets)
so each token costs O(1), and holds text back while it ends in an incomplete character (the
tokenizer shows one as U+FFFD). `TextStream` adds stop strings on top: it keeps back the tail
of the text that could still become a stop string, and when one completes it cuts the text
just before it (or after it, with `include_stop_str_in_output`); when the completion ends
otherwise (EOS, a stop token, the length limit) the held-back tail is flushed. The deltas it
emits always concatenate to the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

INCOMPLETE = "\ufffd"
PREFIX_WINDOW = 5  # tokens of context decoded before the new ones, so spacing comes out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-PREFIX_WINDOW:])
        self.prefix = 0  # start of the decoded window
        self.read = len(self.ids)  # end of what has been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """The text of tokens still held back (an incomplete character at the very end, which
        decodes as U+FFFD), so the completion's text is the decoding of all its tokens."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)


@dataclass
class StreamStep:
    delta: str
    stopped: bool


class TextStream:
    """Text deltas with stop strings. Only the text not yet handed out (`pending`) is kept: it
    is at most the longest stop string plus the newest token's text, so each token costs the
    same however long the completion grows."""

    def __init__(self, detok: IncrementalDetokenizer, stop: tuple[str, ...] = (), include_stop: bool = False):
        self.detok, self.stop, self.include_stop = detok, stop, include_stop
        self.pending = ""  # decoded, not yet emitted: held back while it could begin a stop string

    def add(self, token_id: int, check_stop: bool = True) -> StreamStep:
        old = len(self.pending)
        self.pending += self.detok.add(token_id)
        if not check_stop or not self.stop:  # min_tokens not reached yet: stop strings do not count
            return StreamStep(self._take(len(self.pending)), stopped=False)
        hit = self._find_stop(old)
        if hit is not None:
            self.pending = self.pending[:hit]
            return StreamStep(self._take(len(self.pending)), stopped=True)
        return StreamStep(self._take(len(self.pending) - self._held_back()), stopped=False)

    def flush(self) -> str:
        """Everything held back: the completion ended without a stop string completing."""
        self.pending += self.detok.flush()
        return self._take(len(self.pending))

    def _find_stop(self, old: int) -> int | None:
        """End of the kept text if a stop string completes in the new text, else None."""
        best = None
        for s in self.stop:
            i = self.pending.find(s, max(0, old - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        return best[0] + (len(best[1]) if self.include_stop else 0)

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that is the start of a stop string."""
        longest = 0
        for s in self.stop:
            tail = self.pending[len(self.pending) - min(len(s) - 1, len(self.pending)):]
            i = tail.find(s[0]) if tail else -1
            while i != -1:  # candidate starts only where the stop string's first character is
                if s.startswith(tail[i:]):
                    longest = max(longest, len(tail) - i)
                    break  # the first candidate is the longest tail for this stop string
                i = tail.find(s[0], i + 1)
        return longest

    def _take(self, upto: int) -> str:
        delta, self.pending = self.pending[:upto], self.pending[upto:]
        return delta
