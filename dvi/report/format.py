"""What every report and summary shares, written once: numbers out of JSON records (finite floats, means,
percentiles, rolling means, decoding tokens/s), numbers as text (fixed decimals, markdown cells and
tables), and the files reports read and write (lenient JSONL, JSON and YAML; the JSON report a command
writes at the path it prints).

Stdlib only at import (numpy and yaml are imported where used): commands import it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

PERCENTILES = (50, 90, 99)
DASH = "—"  # a missing value in reports and drift tables (the console tables of bench, eval and a run use "-")


# ---------------------------------------------------------------- numbers


def number(value) -> float | None:
    """A finite float, or None for null / NaN / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def percentiles(values: list[float]) -> list[float] | None:
    """The PERCENTILES of `values` (None for none)."""
    import numpy as np

    return [float(v) for v in np.percentile(values, PERCENTILES)] if values else None


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def decode_tokens_per_s(records: list[dict]) -> float | None:
    """Tokens over the seconds actors spent decoding them (request records' `tokens` / `tokens_per_s`): the
    speed one actor serves at. Records without both numbers are left out."""
    numbers = ((number(r.get("tokens")), number(r.get("tokens_per_s"))) for r in records)
    pairs = [(tokens, tokens / speed) for tokens, speed in numbers if tokens is not None and speed]
    seconds = sum(s for _, s in pairs)
    return sum(t for t, _ in pairs) / seconds if seconds > 0 else None


# ---------------------------------------------------------------- text


def fixed(value, digits: int = 2, none: str = "-") -> str:
    """`value` with `digits` decimals; `none` for None."""
    return none if value is None else f"{value:.{digits}f}"


def md_cell(value, blank: str = DASH) -> str:
    """A markdown table cell: `blank` for None or "", pipes and backslashes escaped, on one line."""
    text = blank if value is None or value == "" else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def md_table(headers: list[str], rows: list[list], blank: str = DASH) -> list[str]:
    """A markdown table's lines (cells through md_cell)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_cell(c, blank) for c in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------- files


def jsonl_records(path: str | Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSONL file, and how many non-blank lines were not one (a run cut short)."""
    records, bad = [], 0
    with Path(path).open(errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    return records, bad


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file; unreadable lines are skipped."""
    return jsonl_records(path)[0]


def read_json(path: str | Path) -> dict:
    """A JSON object file, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping file, or {} when it is missing, broken or not a mapping (only ever a report's extra)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - a broken file is never a reason not to report
        return {}
    return data if isinstance(data, dict) else {}


def write_report(report: dict, out: str | Path) -> Path:
    """A command's JSON report, at the path it prints: benchmark and evaluation results a user finds there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return out
