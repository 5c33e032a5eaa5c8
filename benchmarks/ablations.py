"""The ablation table of a preset: offline runs that each change one thing of the default, over seeds, set against
the default's own offline runs of the same seeds.

    python benchmarks/ablations.py benchmarks/results/accuracy-trees.json \\
        benchmarks/results/accuracy-trees-ablation-*-seed*.json

The first file is the preset's merged table (merge_seeds.py): its plain, offline, online and ultralytics rows are the
reference. Every further file is one accuracy.py run of one seed in mode offline, named
accuracy-<preset>-ablation-<name>-seed<S>.json: the runs of one name are one ablation. Per ablation the table gives
the mean and sample spread over its seeds of best-epoch mAP50-95 and of the mean of the last epochs, and the paired
difference to the default offline run of the same seed (same student start and data order, so only the distillation
differs), mean ± spread over seeds. The JSON (default: accuracy-<preset>-ablations.json next to the table) keeps every
per-seed value, each ablation's store settings and distillation config.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import accuracy
import common
import merge_seeds

NAME = re.compile(r"accuracy-(?P<preset>[\w-]+?)-ablation-(?P<name>[\w-]+)-seed(?P<seed>\d+)\.json$")
REFERENCE = ("plain", "offline", "online", "ultralytics")


def group(paths: list[Path]) -> dict[str, list[Path]]:
    """The inputs by ablation name, in the order names first appear."""
    out: dict[str, list[Path]] = {}
    for p in paths:
        m = NAME.search(p.name)
        if not m:
            raise SystemExit(f"{p}: not named accuracy-<preset>-ablation-<name>-seed<S>.json")
        out.setdefault(m["name"], []).append(p)
    return out


def paired(values: list[float | None], seeds: list[int], base: list[float | None], base_seeds: list[int]) -> list[float] | None:
    """Each seed's value minus the default's value of that seed (None where either has none)."""
    by_seed = dict(zip(base_seeds, base))
    diffs = [None if v is None or by_seed.get(s) is None else v - by_seed[s] for v, s in zip(values, seeds)]
    return None if None in diffs else diffs


def ablation_row(name: str, paths: list[Path], base: dict) -> dict:
    merged = merge_seeds.merge(paths)
    if set(merged["modes"]) != {"offline"}:
        raise SystemExit(f"ablation {name}: its runs must be offline runs only, not {sorted(merged['modes'])}")
    for key in ("preset", "epochs"):
        if merged[key] != base[key]:
            raise SystemExit(f"ablation {name}: {key} {merged[key]!r} differs from the table's {base[key]!r}")
    if merged["teacher"]["weights"] != base["teacher"]["weights"]:
        raise SystemExit(f"ablation {name}: teacher {merged['teacher']['weights']} is not the table's {base['teacher']['weights']}")
    if merged["settings"]["student"] != base["settings"]["student"]:
        raise SystemExit(f"ablation {name}: another student than the table's")
    run, ref = merged["modes"]["offline"], base["modes"]["offline"]
    missing = sorted(set(run["seeds"]) - set(ref["seeds"]))
    if missing:
        raise SystemExit(f"ablation {name}: seeds {missing} have no default offline run in the table")
    row = {"name": name, "inputs": [str(p) for p in paths], "storage": merged.get("storage"), "distill": merged["settings"]["distill"],
           "feature_rows": merged["settings"].get("feature_rows"), "seeds": run["seeds"], "map50_95": run["map50_95"],
           "map50_95_tail": run["map50_95_tail"], "map50": run["map50"], "map50_mean": run["map50_mean"], "map50_std": run["map50_std"]}
    for key in ("map50_95", "map50_95_tail"):
        values = row[key]
        row[f"{key}_mean"], row[f"{key}_std"] = accuracy.mean_std(values) if values else (None, None)
        diffs = paired(values or [None] * len(run["seeds"]), run["seeds"], ref.get(key) or [], ref["seeds"])
        row[f"{key}_vs_default"] = diffs
        row[f"{key}_vs_default_mean"], row[f"{key}_vs_default_std"] = accuracy.mean_std(diffs) if diffs else (None, None)
    return row


def signed(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:+.4f} ± {std:.4f}"


def build(table: Path, paths: list[Path]) -> dict:
    base = json.loads(table.read_text())
    rows = [ablation_row(name, ps, base) for name, ps in group(paths).items()]
    reference = {m: {k: base["modes"][m].get(k) for k in ("seeds", "map50_95_mean", "map50_95_std", "map50_95_tail_mean",
                                                          "map50_95_tail_std", "map50_mean", "map50_std")}
                 for m in REFERENCE if m in base["modes"]}
    return {"preset": base["preset"], "table": str(table), "teacher": base["teacher"], "epochs": base["epochs"],
            "student": base["settings"]["student"], "tail_epochs": accuracy.TAIL, "reference": reference, "ablations": rows,
            "command": "benchmarks/ablations.py " + " ".join(str(p) for p in [table, *paths])}


def render(result: dict, out: Path) -> str:
    rows = [[f"{m} (table)", len(s["seeds"]), accuracy.cell(s["map50_95_mean"], s["map50_95_std"]), "-", accuracy.tail_cell(s), "-",
             accuracy.cell(s["map50_mean"], s["map50_std"])] for m, s in result["reference"].items()]
    for r in result["ablations"]:
        rows.append([r["name"], len(r["seeds"]), accuracy.cell(r["map50_95_mean"], r["map50_95_std"]),
                     signed(r["map50_95_vs_default_mean"], r["map50_95_vs_default_std"]), accuracy.tail_cell(r),
                     signed(r["map50_95_tail_vs_default_mean"], r["map50_95_tail_vs_default_std"]),
                     accuracy.cell(r["map50_mean"], r["map50_std"])])
    t = result["teacher"]
    return common.table(["run", "seeds", "mAP50-95 (best epoch)", "Δ vs default offline, paired",
                         f"mAP50-95, last {result['tail_epochs']} epochs", "Δ vs default offline, paired", "mAP50"], rows,
                        title=f"{result['preset']} preset ablations: {result['student']} offline, teacher {t['model']} "
                              f"({t['map50_95']:.4f} mAP50-95), {result['epochs']} epochs",
                        footer=[f"{r['name']}: store {r['storage']}, distill {r['distill'] or 'default'}" for r in result["ablations"]]
                        + [f"written to {out}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", type=Path, help="the preset's merged table (accuracy-<preset>.json)")
    p.add_argument("runs", type=Path, nargs="+", help="accuracy-<preset>-ablation-<name>-seed<S>.json, one offline run each")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: accuracy-<preset>-ablations.json next to the table)")
    args = p.parse_args()
    result = build(args.table, args.runs)
    out = args.out or args.table.with_name(f"accuracy-{result['preset']}-ablations.json")
    common.write_json(out, result)
    print(render(result, out))


if __name__ == "__main__":
    main()
