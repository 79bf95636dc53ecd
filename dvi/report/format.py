"""Benchmark and run reports are JSON files a user finds at the path the command prints."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return out
