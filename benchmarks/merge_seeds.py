"""Merge accuracy.py results that ran one seed each (in parallel, with the same preset, teacher and data) into one
result with the mean and sample standard deviation over the seeds, and print the table accuracy.py prints.

    python benchmarks/merge_seeds.py OUT.json SEED0.json SEED1.json SEED2.json

Each input must have the same preset, student, teacher weights and modes; the merged file keeps the first input's
header and settings, lists its inputs, and carries every mode's per-seed values, runs and curves.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import common

SAME = ("preset", "regime", "epochs")
# what the data and the training are made from (each run builds its own copy of the data in its own --work)
SAME_SETTINGS = ("data", "train_scenes", "val_scenes", "imgsz", "batch", "nbs", "lr0", "views", "close_mosaic", "fliplr", "distill")


def merge(paths: list[Path]) -> dict:
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    for p, part in zip(paths[1:], parts[1:]):
        for key in SAME:
            if part.get(key) != first.get(key):
                raise SystemExit(f"{p}: {key} {part.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}")
        for key in SAME_SETTINGS:
            if part["settings"].get(key) != first["settings"].get(key):
                raise SystemExit(f"{p}: setting {key} {part['settings'].get(key)!r} differs from {paths[0]}'s")
        if part["teacher"]["weights"] != first["teacher"]["weights"] or part["settings"]["student"] != first["settings"]["student"]:
            raise SystemExit(f"{p}: another teacher or student than {paths[0]}")
        if set(part["modes"]) != set(first["modes"]):
            raise SystemExit(f"{p}: modes {sorted(part['modes'])} differ from {sorted(first['modes'])}")
    seeds = [s for part in parts for s in next(iter(part["modes"].values()))["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed appears in more than one input: {seeds}")
    modes = {}
    for m in first["modes"]:
        entry: dict = {"seeds": [s for part in parts for s in part["modes"][m]["seeds"]]}
        for key in ("map50_95", "map50", "seconds"):
            values = [v for part in parts for v in part["modes"][m][key]]
            entry[key] = values
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["runs"] = [r for part in parts for r in part["modes"][m]["runs"]]
        modes[m] = entry
    curves = {m: {k: v for part in parts for k, v in part.get("curves", {}).get(m, {}).items()} for m in first["modes"]}
    return {**first, "modes": modes, "curves": curves, "merged_from": [str(p) for p in paths],
            "datasets": [part["dataset"] for part in parts],
            "command": "benchmarks/merge_seeds.py " + " ".join(str(p) for p in paths)}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, paths = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    result = merge(paths)
    common.write_json(out, result)
    plain = result["modes"].get("plain")
    rows = []
    for m, s in result["modes"].items():
        gain = f"{s['map50_95_mean'] - plain['map50_95_mean']:+.4f}" if plain and m != "plain" else "-"
        rows.append([f"{result['settings']['student']} {m}", len(s["seeds"]), f"{s['map50_95_mean']:.4f} ± {s['map50_95_std']:.4f}",
                     f"{s['map50_mean']:.4f} ± {s['map50_std']:.4f}", gain])
    t = result["teacher"]
    rows.insert(0, [f"teacher {t['model']}", "-", f"{t['map50_95']:.4f}", f"{t['map50']:.4f}", "-"])
    print(common.table(["model / mode", "seeds", "mAP50-95", "mAP50", "Δ vs plain"], rows,
                       title=f"{result['preset']} preset, merged over seeds {[s for s in next(iter(result['modes'].values()))['seeds']]}",
                       footer=[f"written to {out}"]))


if __name__ == "__main__":
    main()
