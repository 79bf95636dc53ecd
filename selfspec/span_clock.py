"""Seconds spent in named spans of a decoding round (draft, verify), for RoundStats."""
from __future__ import annotations

import time


class SpanClock:
    """Seconds spent in named spans, summed where a name recurs: `with clock("verify"): ...` (spans do
    not nest), then clock["verify"]."""

    def __init__(self):
        self.spans, self._name, self._t = {}, "", 0.0

    def __call__(self, name: str) -> SpanClock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.spans[self._name] = self[self._name] + time.perf_counter() - self._t

    def __getitem__(self, name: str) -> float:
        return self.spans.get(name, 0.0)
