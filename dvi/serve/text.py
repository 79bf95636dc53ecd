"""Token ids in, text out once it is final: what a streamed response may send, and where a stop sequence ends it."""
from __future__ import annotations


class TextStream:
    """Decodes the whole output each time (ids of one response are few) and sends only the new, settled
    text: held back are an unfinished UTF-8 character and any tail that could still grow into a stop
    sequence. `stopped` turns true when a stop sequence appeared; the text ends before it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """The text that `ids` settle; nothing once stopped."""
        if self.stopped:
            return ""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._take(text, min(found))
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        return self._take(text, end - self._partial_stop(text[:end]))

    def finish(self) -> str:
        """The held-back rest, at the end of the response."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of `text` that begins a stop sequence."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out
