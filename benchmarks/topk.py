"""How many anchors a sparse store must keep at 640 px: the distillation-loss error of each K.

A sparse head keeps each image's K most confident anchors (DFL bins and class logits) and one
background logit per class for the rest; sparse features keep the neck vector at those anchors.
At 640 px an image has 8,400 anchors, so K = 64 keeps 0.8% of them. This measures, for each
candidate K and for a score-floor rule with a cap, the error of the distillation loss (the default
config, every term) computed from the store against the same loss from the live teacher's dense
float32 outputs, on the same replayed samples and the same fixed student (storage.py's fidelity).

Use a teacher trained for the data: a random teacher's flat confidences make every K look wrong.
The data should look like the operating point: 640 px scenes with COCO's density (`--build-data`
draws handwritten-digit scenes with about 7 objects per image, a long tail, objects 10-400 px; with
`--inks 8` each digit is inked in one of eight hues and (digit, hue) is its class: COCO's 80 classes).
`--teacher yolo26n.yaml` trains that teacher on the data at --imgsz first (reused when trained with the
same settings); an end-to-end teacher's cached branch is `--teacher-branch`, and `--student` picks the
fixed student whose terms are compared (a YOLO26 teacher's pair: yolo26n.yaml).

Two readings of "within 1%" (`LOSS_LIMIT`) are reported: the summed loss (the feature term dominates
it), and every term on its own (the class and box terms are the ones a sparse head approximates).
The smallest candidate by mean kept anchors is named for each. A run adds to (or replaces) the
candidates of an existing result file for the same teacher, data and image size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from storage import LOSS_LIMIT, _fidelity, _subset

# name -> (head_topk, head_floor[, precision[, box_precision]]); int8 with the box outputs beside the logits unless
# named, with sparse features and the default feature rows (what the default feature term reads), as the default
# store; "default": every storage option at the dump's default for the teacher's head
CANDIDATES = {
    "default": (None, None, None, None),
    "top64": (64, 0.0),
    "top128": (128, 0.0),
    "top256": (256, 0.0),
    "top512": (512, 0.0),
    "floor.01-cap512": (512, 0.01),
    "floor.05-cap512": (512, 0.05),
    "floor.01-cap128": (128, 0.01),
    "floor.01-cap256": (256, 0.01),
    "floor.005-cap256": (256, 0.005),
    "floor.005-cap512": (512, 0.005),
    "floor.002-cap512": (512, 0.002),
    "floor.001-cap512": (512, 0.001),
    "floor.005-cap512-float16": (512, 0.005, "float16"),  # the DFL head's default rule without int8's rounding
    "floor.002-cap512-float16": (512, 0.002, "float16"),
    "floor.001-cap512-float16": (512, 0.001, "float16"),
    "floor.001-cap1024-float16": (1024, 0.001, "float16"),
    "floor.001-cap1024-float16-boxes32": (1024, 0.001, "float16", "float32"),  # a distance head's default store
}
TERMS = ("kd_cls", "kd_box", "kd_feat", "total")


HEADERS = ["candidate", "kept mean", "kept max", "kB/view", "kd_cls %", "kd_box %", "kd_feat %", "total %", "grad cls %", "grad box %", "grad feat %"]


def row(name: str, r: dict) -> list:
    err = r["loss_rel_error_per_term"]
    return [name, r["kept_anchors"]["mean"], r["kept_anchors"]["max"], (r["head_bytes_per_sample_view"] + r["feat_bytes_per_sample_view"]) / 1e3,
            *(100 * err[t]["max"] for t in TERMS), *(100 * err[t]["grad_max"] for t in ("kd_cls", "kd_box", "kd_feat"))]


def smallest(results: dict, ok) -> str | None:
    """The candidate that passes `ok` with the fewest kept anchors on average."""
    passing = [n for n, r in results.items() if ok(r)]
    return min(passing, key=lambda n: results[n]["kept_anchors"]["mean"]) if passing else None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt) trained for --data, or a model yaml to train on it "
                   "first (--teacher-epochs)")
    p.add_argument("--data", default=None, help="data.yaml of the scenes (default: --build-data)")
    p.add_argument("--build-data", default=None, metavar="DIR", help="draw digits scenes at COCO's density and --imgsz in DIR "
                   "(reused when drawn with the same settings) and use them")
    p.add_argument("--inks", type=int, default=8, help="--build-data: ink hues, classes = 10 x inks; 0 for one class per digit "
                   "(default: 8, 80 classes)")
    p.add_argument("--scenes", type=int, default=800, help="--build-data: training scenes (default: 800)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="a --teacher yaml: training epochs (default: 30)")
    p.add_argument("--teacher-batch", type=int, default=8, help="a --teacher yaml: training batch (default: 8)")
    p.add_argument("--teacher-imgsz", type=int, default=None, help="a --teacher yaml: training image size (default: --imgsz). "
                   "Smaller trains in a fraction of the time; its mAP is measured at --imgsz, where the dumps run")
    p.add_argument("--work", default="runs/topk", help="where built data and a trained teacher go (default: runs/topk)")
    p.add_argument("--teacher-branch", choices=["one2many", "one2one", "mean"], default=None,
                   help="end-to-end teacher: the branch cached, as softlabel dump --teacher-branch (default: one2many)")
    p.add_argument("--student", default=None, help="the fixed student whose terms are compared: a model yaml or checkpoint "
                   "(default: yolov8n.yaml)")
    p.add_argument("--imgsz", type=int, default=640, help="image size of the dumps (default: 640)")
    p.add_argument("--images", type=int, default=64, help="training images dumped per candidate (default: 64)")
    p.add_argument("--fidelity-samples", type=int, default=64, help="samples the loss is compared on (default: 64)")
    p.add_argument("--augment", default=None, help="augmentation YAML of the dumps (default: the built-in default)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of: " + ", ".join(CANDIDATES))
    p.add_argument("--batch", type=int, default=8, help="dump batch (default: 8)")
    p.add_argument("--out", default=str(common.RESULTS / "topk.json"), help="result JSON (default: benchmarks/results/topk.json)")
    return p.parse_args()


def kept_anchors(store: str) -> dict:
    """Anchors the sparse head kept per sample-view: mean, min and max over the store."""
    import zarr

    group = zarr.open_group(store, mode="r")
    index = np.asarray(group["v0/head/index"][:])
    kept = (index >= 0).sum(1)
    return {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max())}


def prepare(args: argparse.Namespace) -> dict:
    """Draw the scenes and train the teacher when asked; sets args.data, args.teacher and args.augment.
    Returns what was built, for the result file."""
    from softlabel.demo import Recipe, ensure_teacher
    from softlabel.digits import DigitsSettings, ensure_digits

    built: dict = {}
    work = Path(args.work)
    if args.build_data:
        digits = DigitsSettings(n_train=args.scenes, n_val=max(50, args.scenes // 8), canvas=args.imgsz, min_digit=10,
                                max_digit=min(400, int(args.imgsz * 0.625)), max_digits=80, mean_digits=9, inks=args.inks)
        data, reused = ensure_digits(args.build_data, digits)
        args.data = str(data)
        built["data"] = {**digits.to_dict(), "reused": reused}
    if not args.data:
        raise SystemExit("topk.py: give --data or --build-data")
    if args.teacher.endswith((".yaml", ".yml")):
        recipe = Recipe(imgsz=args.teacher_imgsz or args.imgsz, batch=args.teacher_batch)
        digits = {k: v for k, v in built.get("data", {}).items() if k != "reused"}
        data_id = {"data": str(Path(args.data).resolve()), "digits": digits or None}
        weights, seconds = ensure_teacher(work / f"teacher-{Path(args.teacher).stem}", args.teacher, args.teacher_epochs, recipe, 0,
                                          Path(args.data), data_id)
        from ultralytics import YOLO

        metrics = YOLO(str(weights)).val(data=args.data, imgsz=args.imgsz, batch=args.teacher_batch, device="cpu", plots=False,
                                         verbose=False, project=str(work.resolve()), name="teacher-val", exist_ok=True)
        built["teacher"] = {"model": args.teacher, "epochs": args.teacher_epochs, "batch": args.teacher_batch, "weights": str(weights),
                            "train_imgsz": recipe.imgsz, "val_imgsz": args.imgsz,
                            "train_seconds": seconds, "map50_95": float(metrics.box.map), "map50": float(metrics.box.map50)}
        print(f"teacher {weights}: mAP50-95 {metrics.box.map:.4f}, mAP50 {metrics.box.map50:.4f}", flush=True)
        args.teacher = str(weights)
        if args.augment is None:  # the dumps replay what the teacher trained under
            args.augment = str(recipe.write_augment(work / "augment.yaml"))
    return built


def main() -> None:
    args = parse_args()
    built = prepare(args)
    from softlabel.cache.info import summarize
    from softlabel.dump import DEFAULT_FEATURE_ROWS, SAME, DumpSettings, resolve_head, run_dump
    from softlabel.teacher import load_model

    _, info_t = load_model(args.teacher, branch=args.teacher_branch)
    anchors = sum((args.imgsz // s) ** 2 for s in info_t.strides)
    work = Path(tempfile.mkdtemp(prefix="softlabel-topk-"))
    results: dict = {}
    try:
        subset = _subset(Path(args.data), args.images, work)
        for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
            given = CANDIDATES[name]
            topk, floor, precision, box = given + (None, None, "int8", SAME)[len(given):]
            # the options as the dump resolves them for this teacher's head
            storage = resolve_head(DumpSettings(teacher="", data="", out="", precision=precision, box_precision=box,
                                                head_topk=topk, head_floor=floor), info_t.reg_max)
            topk, floor, precision = storage.head_topk, storage.head_floor, storage.precision
            out = str(work / f"{name}.zarr")
            t = time.perf_counter()
            run_dump(DumpSettings(teacher=args.teacher, data=str(subset), out=out, views=1, close_views=0, imgsz=args.imgsz,
                                  batch=args.batch, workers=1, progress=False, augment=args.augment, precision=precision,
                                  box_precision=storage.box_precision or SAME, head_topk=topk, head_floor=floor,
                                  feature_rows=min(DEFAULT_FEATURE_ROWS, topk), branch=args.teacher_branch))
            seconds = time.perf_counter() - t
            totals = summarize(out)["bytes_per_sample_view_total"]
            kept = kept_anchors(out)
            fidelity = _fidelity(out, Path(args.teacher), subset, args.student, args.fidelity_samples)
            results[name] = {"head_topk": topk, "head_floor": floor, "precision": precision, "box_precision": storage.box_precision, "kept_anchors": kept,
                             "kept_share": kept["mean"] / anchors, "head_bytes_per_sample_view": totals["head"],
                             "feat_bytes_per_sample_view": totals["feat"], "loss_rel_error": fidelity["total"]["max"],
                             "loss_rel_error_per_term": fidelity, "dump_seconds": seconds}
            shutil.rmtree(out, ignore_errors=True)
            print(common.table(HEADERS, [row(name, results[name])]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    same = {k: previous.get("settings", {}).get(k) for k in ("teacher", "data", "imgsz", "images", "augment", "teacher_branch", "student")}
    if same == {k: getattr(args, k) for k in same}:
        results = {**previous.get("candidates", {}), **results}
        built = built or previous.get("built", {})  # the run that drew the data and trained the teacher said how
    chosen = {
        "total": smallest(results, lambda r: r["loss_rel_error"] <= LOSS_LIMIT),
        "every_term": smallest(results, lambda r: all(r["loss_rel_error_per_term"][t]["max"] <= LOSS_LIMIT for t in TERMS)),
        "every_term_and_gradient": smallest(results, lambda r: all(r["loss_rel_error_per_term"][t][k] <= LOSS_LIMIT
                                                                   for t in TERMS for k in ("max", "grad_max"))),
    }
    payload = {**common.header("cpu"), "settings": {k: v for k, v in vars(args).items()}, "built": built, "teacher": info_t.to_dict(), "anchors": anchors,
               "loss_limit": LOSS_LIMIT, "candidates": results, "smallest_within_limit": chosen}
    path = common.write_json(args.out, payload)
    rows = [row(n, r) for n, r in results.items()]
    print(common.table(HEADERS, rows,
                       title=f"sparse store candidates at {args.imgsz} px ({anchors} anchors): max over batches of the loss error "
                             "and of the error of its gradient on the student's outputs",
                       footer=[f"smallest within {100 * LOSS_LIMIT:.0f}%, summed loss: {chosen['total']}; every term: {chosen['every_term']}; "
                               f"every term and its gradient: {chosen['every_term_and_gradient']}",
                               f"written to {path}"]))


if __name__ == "__main__":
    main()
