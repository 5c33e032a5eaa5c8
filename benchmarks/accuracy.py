"""Accuracy of distillation on a real dataset: one student trained four ways, over several seeds.

  plain        Ultralytics alone, no teacher
  offline      softlabel: the teacher's outputs read from a cache written once by `softlabel dump`
  online       softlabel: the same teacher run live on the same replayed inputs, same losses
  ultralytics  Ultralytics' own distillation: train(distill_model=teacher)

Every mode trains the same student architecture with the same data, epochs, image size, batch and
hyperparameters (softlabel.demo.Recipe); only the teacher signal differs. Reported: the mean and
standard deviation over seeds of mAP50-95 and mAP50 on the val split, and the teacher's own.

Cache reuse: each further student architecture (--reuse-students) trains against the same cache,
next to its own plain baseline with the same seeds (--reuse-seeds, default the first seed only).

The default dataset is the demo's: multi-digit scenes built from scikit-learn's handwritten digits
(softlabel.digits), disjoint digit images for train and val. --data takes any Ultralytics data.yaml.
The data, teacher and cache are kept in --work and reused by a later run with the same settings.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict
import time
from pathlib import Path

import common

MODES = ["plain", "offline", "online", "ultralytics"]

# Sizes per preset. gpu: what a comparison should be (not yet run). cpu: about 30 minutes on 2 idle cores when
# --teacher reuses the one `softlabel demo` trained on the same scenes (41 minutes were measured on a shared
# 2-core machine; training the teacher here adds about 15 minutes). quick: a smoke test.
PRESETS = {
    "gpu": dict(device="0", imgsz=320, train_scenes=2000, val_scenes=500, batch=32, epochs=60, teacher_epochs=150,
                views=8, close_mosaic=10, seeds=[0, 1, 2], lr0=0.002),
    "cpu": dict(device="cpu", imgsz=128, train_scenes=300, val_scenes=100, batch=8, epochs=8, teacher_epochs=25,
                views=6, close_mosaic=2, seeds=[0, 1, 2], lr0=0.002),
    "quick": dict(device="cpu", imgsz=64, train_scenes=24, val_scenes=8, batch=8, epochs=2, teacher_epochs=2,
                  views=1, close_mosaic=1, seeds=[0, 1], lr0=0.002),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu", help="sizes and device (default: gpu)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick: a 2-3 minute smoke test, numbers mean nothing")
    p.add_argument("--data", default=None, help="Ultralytics data.yaml (default: the digits scenes, built in --work/data)")
    p.add_argument("--work", default=None, help="folder for data, teacher, cache and runs (default: runs/accuracy-PRESET)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint to use instead of training --teacher-model")
    p.add_argument("--teacher-model", default="yolov8s", help="teacher architecture to train (default: yolov8s)")
    p.add_argument("--student", default="yolov8n", help="student architecture of the four-way comparison (default: yolov8n)")
    p.add_argument("--reuse-students", nargs="*", default=["yolo11n"], help="further students trained against the same cache (default: yolo11n)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds, one run per mode and seed (preset: 0 1 2)")
    p.add_argument("--reuse-seeds", nargs="+", type=int, default=None, help="seeds for the reuse students (default: the first seed)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="modes to run (default: all four)")
    p.add_argument("--distill", default=None, help="softlabel distillation config, a built-in name or a YAML path (default: default)")
    for name in ("epochs", "teacher_epochs", "imgsz", "batch", "views", "close_mosaic", "train_scenes", "val_scenes"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--lr0", type=float, default=None, help="initial learning rate, AdamW (preset: 0.002)")
    p.add_argument("--fliplr", type=float, default=None, help="horizontal flip probability (default: 0 on digits, 0.5 on --data)")
    p.add_argument("--device", default=None, help="cpu, 0, cuda:N (preset: 0 for gpu, cpu otherwise)")
    p.add_argument("--precision", default=None, choices=["float16", "bfloat16", "int8"],
                   help="cache precision, as softlabel dump --precision (default: the dump's default)")
    p.add_argument("--head-topk", type=int, default=None, help="sparse head: anchors kept per image, as softlabel dump --head-topk")
    p.add_argument("--features", choices=["sparse", "dense"], default=None, help="feature layout, as softlabel dump --features")
    p.add_argument("--head-floor", type=float, default=None, help="sparse head: minimum teacher score, as softlabel dump --head-floor")
    p.add_argument("--out", default=str(common.RESULTS / "accuracy.json"), help="result JSON (default: benchmarks/results/accuracy.json)")
    args = p.parse_args()
    if args.quick:
        args.preset = "quick"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.reuse_seeds = args.reuse_seeds or args.seeds[:1]
    args.work = Path(args.work or f"runs/accuracy-{args.preset}")
    if args.fliplr is None:
        args.fliplr = 0.5 if args.data else 0.0
    if args.imgsz % 32:
        p.error("--imgsz must be a multiple of 32")
    return args


def prepare_data(args, echo=print) -> tuple[Path, dict]:
    """The data.yaml and what identifies its training split (for the teacher's and the cache's manifests)."""
    from softlabel.demo import digits_for
    from softlabel.digits import ensure_digits

    if args.data:
        from softlabel.data import build_index, load_data_yaml

        spec = load_data_yaml(args.data)
        return Path(args.data), {"yaml": str(spec.yaml_path), "images_hash": build_index(spec, "train", check_images=False).list_hash()}
    settings = digits_for(args.imgsz, args.train_scenes, args.val_scenes, seed=0)
    data_yaml, reused = ensure_digits(args.work / "data", settings)
    echo(f"dataset: {'reused' if reused else 'built'} {data_yaml}")
    return data_yaml, settings.to_dict()


def run_mode(mode: str, student: str, seed: int, args, ctx: dict) -> dict:
    from softlabel.demo import train_student, validate, weights_of
    from softlabel.train import make_trainer

    extra: dict = {}
    if mode == "offline":
        extra["trainer"] = make_trainer(cache=str(ctx["store"].resolve()), distill_config=args.distill)
    elif mode == "online":  # the same replay (augmentation config, seed, views) the cache was dumped with
        extra["trainer"] = make_trainer(teacher_path=str(ctx["teacher"]), distill_config=args.distill, views=args.views,
                                        close_views=ctx["close_views"], replay_seed=0, augment_config=str(ctx["augment"]))
    elif mode == "ultralytics":
        extra["distill_model"] = str(ctx["teacher"])
    project = args.work / "runs" / Path(student).stem
    run, seconds = train_student(student, ctx["recipe"], ctx["data"], args.epochs, seed, project, f"{mode}-s{seed}", **extra)
    map50, map50_95 = validate(weights_of(run), ctx["data"], ctx["recipe"], args.work / "val", f"{Path(student).stem}-{mode}-s{seed}")
    return {"map50_95": map50_95, "map50": map50, "seconds": seconds, "run": str(run)}


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    out: dict = {"seeds": seeds}
    for key in ("map50_95", "map50", "seconds"):
        values = [r[key] for r in runs]
        out[key] = values
        out[f"{key}_mean"] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def main() -> None:
    args = parse_args()
    from softlabel.demo import Recipe, checkpoint_arch, ensure_cache, ensure_teacher, validate

    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(imgsz=args.imgsz, batch=args.batch, device=args.device, close_mosaic=args.close_mosaic, lr0=args.lr0, fliplr=args.fliplr)
    data_yaml, data_id = prepare_data(args)
    if args.teacher:
        teacher, teacher_seconds = Path(args.teacher), None
    else:
        teacher, teacher_seconds = ensure_teacher(args.work / "teacher", args.teacher_model, args.teacher_epochs, recipe, 0, data_yaml, data_id)
    t_map50, t_map50_95 = validate(teacher, data_yaml, recipe, args.work / "val", "teacher")
    print(f"teacher {Path(teacher)}: mAP50-95 {t_map50_95:.4f}, mAP50 {t_map50:.4f}", flush=True)

    close_views = 1 if min(args.close_mosaic, args.epochs - 1) > 0 else 0
    storage = {k: v for k, v in (("precision", args.precision), ("head_topk", args.head_topk), ("head_floor", args.head_floor),
                                            ("feature_layout", args.features)) if v is not None}
    # one store per storage choice, so comparing them keeps every cache
    store = args.work / ("cache" + "".join(f"-{k}{v}" for k, v in storage.items()) + ".zarr")
    dump_seconds, _ = ensure_cache(store, teacher, data_yaml, data_id, recipe, args.views, close_views, 0, **storage)
    ctx = {"data": data_yaml, "teacher": teacher, "store": store, "recipe": recipe, "close_views": close_views,
           "augment": store.parent / f"{store.stem}.augment.yaml"}

    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for seed in args.seeds:  # seed-major, so a slow spell on a shared machine hits every mode alike
        for mode in args.modes:
            res = run_mode(mode, args.student, seed, args, ctx)
            runs[mode].append(res)
            print(f"seed {seed} {mode:<12} mAP50-95 {res['map50_95']:.4f}  mAP50 {res['map50']:.4f}  ({res['seconds']:.0f} s)", flush=True)

    reuse: dict[str, dict] = {}
    for student in args.reuse_students:
        entry: dict = {}
        for mode in ("plain", "offline"):
            rs = [run_mode(mode, student, seed, args, ctx) for seed in args.reuse_seeds]
            entry[mode] = summarise(rs, args.reuse_seeds)
            print(f"reuse {student} {mode:<8} mAP50-95 {entry[mode]['map50_95_mean']:.4f}", flush=True)
        entry["seeds"] = args.reuse_seeds
        entry["single_seed"] = len(args.reuse_seeds) == 1
        entry["gain_map50_95"] = entry["offline"]["map50_95_mean"] - entry["plain"]["map50_95_mean"]
        reuse[Path(student).stem] = entry

    modes = {m: summarise(rs, args.seeds) for m, rs in runs.items()}
    for m, rs in runs.items():
        modes[m]["runs"] = [r["run"] for r in rs]
    result = {
        **common.header(args.device),
        "preset": args.preset,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "recipe": asdict(recipe),
        "dataset": str(data_yaml),
        "teacher": {"model": checkpoint_arch(teacher) if args.teacher else args.teacher_model, "weights": str(teacher),
                    "epochs": None if args.teacher else args.teacher_epochs, "train_seconds": teacher_seconds,
                    "map50_95": t_map50_95, "map50": t_map50},
        "storage": storage or "default",
        "dump_seconds": dump_seconds,
        "modes": modes,
        "reuse": reuse,
        "wall_seconds": round(time.time() - start, 1),
    }
    out = common.write_json(args.out, result)
    print()
    print(render(result, args, out))


def render(result: dict, args, out: Path) -> str:
    def cell(mean: float, std: float) -> str:
        return f"{mean:.4f} ± {std:.4f}"

    t = result["teacher"]
    rows = [[f"teacher {t['model']}", "-", f"{t['map50_95']:.4f}", f"{t['map50']:.4f}", "-"]]
    plain = result["modes"].get("plain")
    for m, s in result["modes"].items():
        gain = s["map50_95_mean"] - plain["map50_95_mean"] if plain else None
        rows.append([f"{Path(args.student).stem} {m}", len(s["seeds"]), cell(s["map50_95_mean"], s["map50_95_std"]),
                     cell(s["map50_mean"], s["map50_std"]), "-" if gain is None or m == "plain" else f"{gain:+.4f}"])
    for name, e in result["reuse"].items():
        for m in ("plain", "offline"):
            s = e[m]
            gain = e["gain_map50_95"] if m == "offline" else None
            rows.append([f"{name} {m} (reuse)", len(s["seeds"]), cell(s["map50_95_mean"], s["map50_95_std"]),
                         cell(s["map50_mean"], s["map50_std"]), "-" if gain is None else f"{gain:+.4f}"])
    title = (f"{args.preset} preset: {Path(args.student).stem} student, {t['model']} teacher, imgsz {args.imgsz}, "
             f"{args.epochs} epochs, batch {args.batch}, device {args.device}; mean ± std over seeds")
    footer = [f"val split of {result['dataset']}; wall time {result['wall_seconds'] / 60:.1f} min; written to {out}"]
    if args.preset == "quick":
        footer.insert(0, "QUICK RUN: a smoke test; these numbers mean nothing.")
    return common.table(["model / mode", "seeds", "mAP50-95", "mAP50", "Δ vs plain"], rows, title, footer)


if __name__ == "__main__":
    main()
