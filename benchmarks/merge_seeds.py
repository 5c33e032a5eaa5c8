"""Merge accuracy.py results that ran one seed each (in parallel, with the same preset, teacher and data) into one
result with the mean and sample standard deviation over the seeds, and print the table accuracy.py prints.

    python benchmarks/merge_seeds.py OUT.json SEED0.json SEED1.json SEED2.json

Each input must have the same preset, data settings and student, and every input that distils the same teacher
weights (a plain run reads no teacher, so its input may name another). Inputs may hold different modes, one process
per mode and seed: each mode gathers its seeds from the inputs that ran it, and no seed of a mode may come twice. The
merged file keeps the first input's header and settings, lists its inputs, and carries every mode's per-seed values,
runs and curves; its teacher is that of the inputs that distil.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import accuracy
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
        if part["settings"]["student"] != first["settings"]["student"]:
            raise SystemExit(f"{p}: another student than {paths[0]}")
    distilling = [(p, part) for p, part in zip(paths, parts) if set(part["modes"]) - {"plain"}]
    for p, part in distilling[1:]:
        if part["teacher"]["weights"] != distilling[0][1]["teacher"]["weights"]:
            raise SystemExit(f"{p}: another teacher than {distilling[0][0]}")
    names = list(dict.fromkeys(m for part in parts for m in part["modes"]))
    curves = {m: {k: v for part in parts for k, v in part.get("curves", {}).get(m, {}).items()} for m in names}
    modes = {}
    for m in names:
        having = [part["modes"][m] for part in parts if m in part["modes"]]
        seeds = [s for h in having for s in h["seeds"]]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"mode {m}: a seed appears in more than one input: {seeds}")
        # each input's runs as accuracy.summarise takes them, each with its seed's curve
        runs = [{"map50_95": h["map50_95"][i], "map50": h["map50"][i], "seconds": h["seconds"][i],
                 "curve": curves[m].get(str(seed)) or []} for h in having for i, seed in enumerate(h["seeds"])]
        modes[m] = {**accuracy.summarise(runs, seeds), "runs": [r for h in having for r in h["runs"]]}
    teacher = (distilling[0][1] if distilling else first)["teacher"]
    flat = accuracy.flatness(accuracy.mean_curve(list(curves["plain"].values()))) if curves.get("plain") else None
    return {**first, "teacher": teacher, "modes": modes, "curves": curves, "plain_flatness": flat,
            "plain_flattened": flat["flattened"] if flat else None, "views_study": None, "merged_from": [str(p) for p in paths],
            "datasets": [part["dataset"] for part in parts],
            "command": "benchmarks/merge_seeds.py " + " ".join(str(p) for p in paths)}


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, paths = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
    result = merge(paths)
    common.write_json(out, result)
    seeds = sorted({s for m in result["modes"].values() for s in m["seeds"]})
    args = SimpleNamespace(**{**result["settings"], "seeds": seeds})
    result["plot"] = str(accuracy.plot(result, args, out.with_suffix(".png")))
    common.write_json(out, result)
    plain = result["modes"].get("plain")
    rows = []
    for m, s in result["modes"].items():
        gain = f"{s['map50_95_mean'] - plain['map50_95_mean']:+.4f}" if plain and m != "plain" else "-"
        tail_gain = (f"{s['map50_95_tail_mean'] - plain['map50_95_tail_mean']:+.4f}" if plain and m != "plain"
                     and None not in (s["map50_95_tail_mean"], plain["map50_95_tail_mean"]) else "-")
        rows.append([f"{result['settings']['student']} {m}", len(s["seeds"]), accuracy.cell(s["map50_95_mean"], s["map50_95_std"]),
                     accuracy.cell(s["map50_mean"], s["map50_std"]), gain, accuracy.tail_cell(s), tail_gain])
    t = result["teacher"]
    rows.insert(0, [f"teacher {t['model']}", "-", f"{t['map50_95']:.4f}", f"{t['map50']:.4f}", "-", "-", "-"])
    print(common.table(["model / mode", "seeds", "mAP50-95 (best epoch)", "mAP50", "Δ vs plain",
                        f"mAP50-95, last {accuracy.TAIL} epochs", "Δ vs plain"], rows,
                       title=f"{result['preset']} preset, merged from {len(result['merged_from'])} inputs",
                       footer=[f"written to {out}"]))


if __name__ == "__main__":
    main()
