"""`dvi bench-buffer` end to end on a tiny run: it must produce every number the report promises."""
from __future__ import annotations

import json
import math
import re

from dvi import cli


def test_bench_buffer_writes_every_metric(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"bench-buffer": "dvi.cli.bench_buffer"})
    out = tmp_path / "bench.json"
    assert cli.main(["bench-buffer", "--n", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["records"]) == {"smollm2", "smollm2-int8", "7b", "7b-int8"}
    assert report["versions"]["redis"]
    for name, row in report["records"].items():
        assert min(row["write_tps"], row["read_tps"], row["redis_mb_per_10k"]) > 0, name
    records = report["records"]
    assert records["smollm2"]["bytes_per_transition"] > 4 * 576 * 2  # the float16 hidden states alone
    assert records["7b-int8"]["bytes_per_transition"] < 0.6 * records["7b"]["bytes_per_transition"]
    weights = report["weights"]
    assert weights["weight_pull_ms"] > 0 and weights["arrays"]
    # the blob is its float32 arrays, uncompressed, plus a small header (blob_mb is rounded to 0.01)
    array_mb = sum(math.prod(shape) for shape in weights["arrays"].values()) * 4 / 1e6
    assert array_mb > 10 and array_mb - 0.005 <= weights["blob_mb"] <= array_mb + 0.01
    printed = re.search(r"weights \((\d+\.\d+) MB float32 head\)", capsys.readouterr().out)
    assert printed and float(printed.group(1)) == weights["blob_mb"]
