"""The short table a GPU phase prints last: its steps, then every benchmark in $OUT.

Reads $OUT/status.tsv (one row per step, written by .ci/gpu/lib.sh as each step ends) and the
bench-*.json files the phases copy there, so it also works on what a cut-short run left.
Usage: python3 table.py OUT_FOLDER. Stdlib only.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

TARGETS = "targets (H100, fp16, graphs): batch 1 <= 0.25 ms/token; batch 64 >= 50,000 tokens/s"


def steps(out: Path) -> list[str]:
    path = out / "status.tsv"
    if not path.is_file():
        return ["(no steps recorded)"]
    lines = [f"{'phase':<6}{'step':<22}{'exit':<9}{'s':>5}  note"]
    for row in csv.reader(path.open(), delimiter="\t"):
        phase, name, rc, secs, note = (row + [""] * 5)[:5]
        lines.append(f"{phase:<6}{name:<22}{rc:<9}{secs:>5}  {note}")
    return lines


def bench_rows(path: Path) -> list[str]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{path.name}: unreadable ({e})"]
    lines = []
    for name, runner in results.get("runners", {}).items():
        if "results" not in runner:
            lines.append(f"{path.stem:<10}{name:<20}{runner.get('error') or runner.get('skipped')}")
            continue
        for r in runner["results"]:
            ms, tps = r["decode_ms_per_token"]["median"], r["tokens_per_s"]["median"]
            same = "yes" if r.get("same_tokens_as_ours") else f"{r.get('token_agreement', 0):.0%}"
            lines.append(
                f"{path.stem:<10}{name:<20}{r['batch']:>5}{r['prompt_len']:>7}{ms:>10.3f}{tps:>12.0f}"
                f"{r.get('decode_vs_ours', 0):>8.2f}x{r.get('fraction_of_floor', 0):>7.0%}  {same}"
            )
    return lines


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python3 table.py OUT_FOLDER", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    print("\n".join(steps(out)))
    benches = sorted(out.glob("bench-*.json"))
    if benches:
        print(
            f"\n{'file':<10}{'runner':<20}{'batch':>5}{'prompt':>7}{'ms/token':>10}{'tokens/s':>12}"
            f"{'vs ours':>9}{'floor':>7}  same tokens as ours"
        )
        for path in benches:
            print("\n".join(bench_rows(path)))
        print(TARGETS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
