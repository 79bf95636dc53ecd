"""One markdown table of every `dvi bench` JSON (bench_*.json) and `dvi profile` JSON (profile_*/profile.json)
in a directory, as scripts/gpu_check.sh leaves them.

    python scripts/gpu_summary.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def bench_rows(path: Path) -> list[str]:
    report = json.loads(path.read_text())
    where = f"{report['dtype']}, passes {report.get('passes', 'eager')}"
    rows = []
    for m in report["methods"]:
        mal = m.get("mean_accepted_length")
        same_ar = m.get("identical_to_dvi_ar")
        margins = [d["logit_margin"] for d in m.get("divergences", [])]
        rows.append(f"| {path.stem.removeprefix('bench_')} | {where} | {m['name']} | {m['tokens_per_s']:.1f} | "
                    f"{m['speedup']:.2f}x | {'-' if mal is None else f'{mal:.2f}'} | {m['identical_to_ar']:.0%} | "
                    f"{'-' if same_ar is None else f'{same_ar:.0%}'} | "
                    f"{'-' if not margins else f'{max(margins):.3g}'} |")
    return rows


def profile_rows(path: Path) -> list[str]:
    report = json.loads(path.read_text())
    where = f"{report['dtype']}, passes {report['passes']}"

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)
    return [f"| {path.parent.name.removeprefix('profile_')} | {where} | {m['name']} | {m['tokens_per_s']:.1f} | "
            f"{m['wall_ms_per_token']:.2f} | "
            f"{m['cpu_op_ms_per_token']:.2f} | {cell(m['gpu_ms_per_token'], '.2f')} | "
            f"{cell(m['kernels_per_token'], '.0f')} | {cell(m['gpu_busy'], '.0%')} |" for m in report["methods"]]


def main(out_dir: str) -> int:
    root = Path(out_dir)
    benches = sorted(root.glob("bench_*.json"))
    profiles = sorted(root.glob("profile_*/profile.json"))
    if benches:
        first = json.loads(benches[0].read_text())
        print(f"## dvi bench on {first['machine']} ({first['model']}, {first['n_prompts']} prompts x "
              f"{first['max_new_tokens']} new tokens, batch 1, greedy)\n")
        print("| run | dtype, passes | method | tok/s | vs hf_ar | MAL | identical to hf_ar | identical to dvi_ar "
              "| largest margin at a divergence |")
        print("|---|---|---|---|---|---|---|---|---|")
        for path in benches:
            print("\n".join(bench_rows(path)))
    if profiles:
        print("\n## dvi profile, per generated token\n")
        print("| run | dtype, passes | method | tok/s | wall ms | CPU op ms | GPU kernel ms | kernels | GPU busy |")
        print("|---|---|---|---|---|---|---|---|---|")
        for path in profiles:
            print("\n".join(profile_rows(path)))
    if not benches and not profiles:
        print(f"no bench_*.json or profile_*/profile.json in {root}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
