"""What a run did, in numbers: `summary.json` from the request records, the stream's counters, the
learner's counters and the held-out score of every published version.

The transition counts balance: every transition an actor wrote was trained, dropped (trimmed as the
oldest under backpressure, too stale or a duplicate), sent to the dead-letter stream, or is still
buffered in the stream. `counts_balance` says whether the four add up to `transitions_written`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from buffer.keys import RunKeys
from dvi.report.format import PERCENTILES, decode_tokens_per_s, percentiles
from selfspec.versions import package_versions


def stream_buffered(client: redis.Redis, run_id: str) -> int:
    """Transitions still in the stream (entries are deleted once acknowledged), counted from the entries."""
    total, start = 0, "-"
    while True:
        entries = client.xrange(RunKeys(run_id).transitions, start, "+", count=1000)
        total += sum(int(fields.get(b"n", 0)) for _, fields in entries)
        if len(entries) < 1000:
            return total
        start = "(" + entries[-1][0].decode()


def windows(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """The first and the last `fraction` of the completed requests, by completion time."""
    done = sorted((r for r in records if r["ok"]), key=lambda r: r["done_s"])
    k = max(1, round(fraction * len(done))) if done else 0
    return done[:k], done[-k:] if k else []


def mean_mal(records: list[dict]) -> float | None:
    values = [r["mean_accepted_length"] for r in records if r.get("mean_accepted_length") is not None]
    return float(np.mean(values)) if values else None


def named_percentiles(values: list[float]) -> dict[str, float] | None:
    """{"p50": ..., "p90": ..., "p99": ...} (None for no values)."""
    found = percentiles(values)
    return None if found is None else {f"p{q}": v for q, v in zip(PERCENTILES, found)}


def per_workload(records: list[dict]) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["workload"] or "(none)", []).append(r)
    out = {}
    for name, rows in groups.items():
        ok = [r for r in rows if r["ok"]]
        out[name] = {"requests": len(rows), "completed": len(ok), "mean_accepted_length": mean_mal(ok),
                     "tokens_per_s": decode_tokens_per_s(ok),
                     "latency_s": named_percentiles([r["latency_s"] for r in ok])}
    return out


@dataclass(frozen=True)
class LearningCounts:
    """What the learning side counted by the end of a run (dvi.run.plane.LearningPlane.finish)."""
    stats: dict[str, int]  # the stream's run-wide counters (buffer.stream.run_stats)
    trained: int  # transitions the learner trained
    versions: list[dict]  # versions.jsonl's entries
    buffered: int  # entries still in the stream
    held_back: int  # heads the publish gate kept from the actors


def summarize(records: list[dict], fraction: float, learning: LearningCounts | None = None) -> dict:
    """summary.json's numbers; `learning` is None in a serve-only run."""
    ok = [r for r in records if r["ok"]]
    first, last = windows(records, fraction)
    summary = {
        "requests_total": len(records), "requests_completed": len(ok), "requests_failed": len(records) - len(ok),
        "tokens_generated": sum(r["tokens"] for r in ok),
        "tokens_per_s_first_window": decode_tokens_per_s(first),
        "tokens_per_s_last_window": decode_tokens_per_s(last),
        "tokens_per_s_all": decode_tokens_per_s(ok),
        "live_mal_first_window": mean_mal(first), "live_mal_last_window": mean_mal(last),
        "window_requests": len(first),
        "latency_s": named_percentiles([r["latency_s"] for r in ok]),
        "ttft_s": named_percentiles([r["ttft_s"] for r in ok]),
        "workloads": per_workload(records),
        "versions": package_versions(),  # what the actors and the learner ran with (selfspec.versions)
    }
    if learning is None:
        return summary
    stats, trained, buffered, held_back = learning.stats, learning.trained, learning.buffered, learning.held_back
    dropped = sum(stats.get(k, 0) for k in ("dropped_oldest", "stale", "duplicates"))
    written = stats.get("written", 0)
    versions = learning.versions
    scores = dict(sorted((v["version"], v["heldout_mal"]) for v in versions if v.get("heldout_mal") is not None))
    summary.update({
        "transitions_written": written, "transitions_trained": trained, "transitions_dropped": dropped,
        "transitions_buffered": buffered, "deadletter": stats.get("deadletter", 0),
        "dropped_detail": {k: stats.get(k, 0) for k in ("dropped_oldest", "stale", "duplicates")},
        "counts_balance": trained is not None and buffered is not None
        and written == trained + dropped + stats.get("deadletter", 0) + buffered,
        "versions_published": len({v["version"] for v in versions}), "versions_held_back": held_back,
        "heldout_mal_by_version": {str(v): m for v, m in scores.items()},
        "mal_first_window": scores[min(scores)] if scores else None,
        "mal_last_window": scores[max(scores)] if scores else None,
    })
    return summary
