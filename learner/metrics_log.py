"""Metrics of a training loop, written as they come: one JSON line per record and TensorBoard scalars.

Keys named like cleanRL's (`losses/...`, `charts/...`) become TensorBoard scalars at the record's
`step`; every key goes to `metrics.jsonl`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: str | Path, filename: str = "metrics.jsonl", append: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.dir / filename).open("a" if append else "w")
        self._tb = SummaryWriter(str(self.dir / "tb"))

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        for name, value in record.items():
            if "/" in name and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
