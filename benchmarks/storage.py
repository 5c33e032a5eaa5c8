"""Storage options of `softlabel dump`: what each byte saved costs.

For each option (precision, sparse head, codec, feature levels) the same data is dumped with the
same trained teacher, and measured for:

- bytes on disk per sample-view, head and features (`softlabel info`'s totals);
- dump throughput (sample-views per second, replay + teacher + encode + write) and read throughput
  (samples per second through CacheReader.read, decode included);
- fidelity: the distillation loss (the built-in default distillation config, all terms) computed from the store
  against the same loss from the dense float32 outputs of the live teacher, on the same samples and
  the same fixed student; relative error |store - live| / |live| per batch, max and mean; and the
  error of what the student learns from each term, its gradient on the student's outputs:
  ||g_store - g_live|| / ||g_live|| per batch (`grad_max`, `grad_mean`).

Sizes are then scaled to a 640 px, 80-class YOLOv8x sample-view (8400 anchors, 144 head channels,
feature channels 320/640/640) with the bytes per stored value each option achieved here; a sparse
head keeps the same share of anchors at 640 px as here (the same scene covers more anchors), and a
COCO train2017 cache (118,287 images x 4 views) is extrapolated for the chosen default.
Use a trained teacher: random weights produce near-constant outputs that compress unrealistically.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

COCO_IMAGES, COCO_VIEWS = 118_287, 4
V8X_640 = {"anchors": 8400, "head_channels": 64 + 80, "nc": 80, "feat_values": 320 * 80 * 80 + 640 * 40 * 40 + 640 * 20 * 20}

# name -> dump options; every option is spelled out, so a change of the dump's defaults cannot change a row
DENSE = dict(head_topk=0, feature_layout="dense")
OPTIONS = {
    "dense-f16": dict(precision="float16", **DENSE),
    "dense-f16-zstd": dict(precision="float16", codec="zstd", **DENSE),
    "dense-f16-lz4": dict(precision="float16", codec="blosc-lz4", **DENSE),
    "dense-bf16": dict(precision="bfloat16", **DENSE),
    "dense-int8": dict(precision="int8", **DENSE),
    "sparse64-f16": dict(precision="float16", head_topk=64, head_floor=0.0, feature_rows=64),
    "sparse64-int8": dict(precision="int8", head_topk=64, head_floor=0.0, feature_rows=64),
    "sparse32-f16": dict(precision="float16", head_topk=32, head_floor=0.0, feature_rows=32),
    "sparse32-int8": dict(precision="int8", head_topk=32, head_floor=0.0, feature_rows=32),
    "sparse64-int8-floor.01": dict(precision="int8", head_topk=64, head_floor=0.01, feature_rows=64),
    "sparse128-int8-floor.01": dict(precision="int8", head_topk=128, head_floor=0.01, feature_rows=64),
    "sparse512-int8-floor.005": dict(precision="int8", head_topk=512, head_floor=0.005, feature_rows=64),
    "feat-p4p5-int8": dict(precision="int8", head_topk=32, head_floor=0.0, levels=["p4", "p5"], feature_layout="dense"),
}
# what `softlabel dump` stores without options (softlabel.dump.DumpSettings)
DUMP_DEFAULT = "sparse512-int8-floor.005"
DEFAULT_TOPK = OPTIONS[DUMP_DEFAULT]["head_topk"]
LOSS_LIMIT = 0.01
HEAD_LIMIT = 0.3e6


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="trained teacher checkpoint (.pt); default: the demo's (runs/demo)")
    p.add_argument("--data", help="data.yaml the teacher was trained on; default: the demo's dataset")
    p.add_argument("--demo-dir", default="runs/demo", help="where `softlabel demo` left its run (default: runs/demo)")
    p.add_argument("--student", default=None, help="student for the fidelity loss: a checkpoint, or a model yaml at a fixed random init "
                   "(default: yolov8n.yaml)")
    p.add_argument("--imgsz", type=int, default=None, help="image size (default: the demo's, else 160)")
    p.add_argument("--images", type=int, default=128, help="training images dumped per option (default: 128)")
    p.add_argument("--augment", default=None, help="augmentation YAML for the dumps (default: the demo's, else the built-in default)")
    p.add_argument("--fidelity-samples", type=int, default=64, help="samples the loss is compared on (default: 64)")
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated subset of: " + ", ".join(OPTIONS))
    p.add_argument("--batch", type=int, default=16, help="dump batch (default: 16)")
    p.add_argument("--out", default=str(common.RESULTS / "storage.json"), help="result JSON (default: benchmarks/results/storage.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: a toy dataset and a random yolov8n teacher at imgsz 64")
    p.add_argument("--at-640", action="store_true",
                   help="measure the dump's default store at the operating point instead (640 px, 80 classes, a yolov8x "
                        "built from yaml, --images drawn images) and update 'default' in --out; nothing is scaled")
    p.add_argument("--kept-640", default=None,
                   help="with --at-640: comma-separated kept anchors; the random teacher is calibrated so that the median "
                        "image keeps the first (see benchmarks/common.py calibrate_teacher), which becomes 'default'; a "
                        "value of 512 (the cap) dumps with --head-floor 0, every image keeping 512 (default: the mean a "
                        "trained teacher kept under the default rule in results/topk.json, then 512)")
    p.add_argument("--teacher-cfg", default="yolov8x.yaml", help="with --at-640: the teacher yaml (default: yolov8x.yaml)")
    return p.parse_args()


def _demo_inputs(args) -> tuple[Path, Path, int]:
    import json

    results = Path(args.demo_dir) / "results.json"
    if args.teacher and args.data:
        return Path(args.teacher), Path(args.data), args.imgsz or 160
    if not results.is_file():
        raise SystemExit(f"no --teacher/--data and no demo run at {results}; run `softlabel demo` first")
    demo = json.loads(results.read_text())
    teacher = args.teacher or demo["teacher"]["weights"]
    data = args.data or Path(demo["run_dir"]) / "data" / "data.yaml"
    return Path(teacher), Path(data), args.imgsz or int(demo["imgsz"])


def _subset(data_yaml: Path, images: int, work: Path) -> Path:
    """The first N training images of a dataset, as its own data.yaml (same root, list file)."""
    from softlabel.data import build_index, load_data_yaml

    spec = load_data_yaml(data_yaml)
    index = build_index(spec, "train", check_images=False)
    chosen = [str(p) for p in index.images[: min(images, len(index))]]
    (work / "train.txt").write_text("\n".join(chosen) + "\n")
    val = spec.splits.get("val", spec.splits["train"])
    val = [v if Path(v).is_absolute() else str(spec.root / v) for v in val]
    import yaml

    out = work / "subset.yaml"
    out.write_text(yaml.safe_dump({"path": str(spec.root), "train": str(work / "train.txt"), "val": val, "names": list(spec.names)}))
    return out


def _as_leaves(value, leaves: list):
    """The student's outputs (tensors in lists and dicts, an end-to-end head's branches nested) as fresh
    leaves that need a gradient, each appended to `leaves`."""
    if isinstance(value, dict):
        return {k: _as_leaves(v, leaves) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_leaves(v, leaves) for v in value)
    leaf = value.detach().requires_grad_()
    leaves.append(leaf)
    return leaf


def _fidelity(store: str, teacher_pt: Path, data_yaml: Path, student_pt: str | None, samples: int) -> dict:
    from ultralytics.nn.tasks import DetectionModel

    from softlabel.augment import AugmentConfig
    from softlabel.cache.reader import CacheReader
    from softlabel.data import build_index, load_data_yaml
    from softlabel.distill.config import load_distill
    from softlabel.heads import head_spec
    from softlabel.distill.distiller import Distiller, TeacherBatch, split_head
    from softlabel.replay import Replay
    from softlabel.teacher import Teacher
    from softlabel.train import DistillDataset, ViewPlan

    reader = CacheReader(store)
    aug = reader.attrs["augment"]
    replay = Replay(build_index(load_data_yaml(data_yaml), check_images=False), AugmentConfig.from_attrs(aug), int(aug["imgsz"]), int(aug["seed"]))
    ds = DistillDataset(replay, ViewPlan(1, 0, 1, 1), reader)
    teacher = Teacher.load(teacher_pt, branch=reader.description.teacher.branch or None)  # the live teacher says what the store kept
    torch.manual_seed(0)
    if student_pt and not student_pt.endswith((".yaml", ".yml")):
        from ultralytics import YOLO

        student = YOLO(student_pt).model.float()
    else:
        student = DetectionModel(student_pt or "yolov8n.yaml", nc=teacher.info.nc, verbose=False)
    student.train()
    spec = head_spec(student)
    levels, channels, reg_max = list(spec.levels), list(spec.channels), spec.reg_max
    distiller = Distiller(load_distill(None, reg_max, teacher.info.reg_max), reg_max, levels, channels, teacher.info.levels,
                          teacher.info.feature_channels, teacher_reg_max=teacher.info.reg_max, student_strides=list(spec.strides),
                          student_branches=spec.branches, nc=spec.nc)
    rel = {k: [] for k in ("total", "kd_cls", "kd_box", "kd_feat")}
    grad = {k: [] for k in rel}
    n = min(samples, len(ds))
    for start in range(0, n, 8):
        with torch.no_grad():
            batch = DistillDataset.collate_fn([ds[(i, 0)] for i in range(start, min(start + 8, n))])
            preds = student(batch["img"].float() / 255)
            stored = batch["teacher"]
            live = teacher(batch["img"].float() / 255)
            live_feats = dict(zip(teacher.info.levels, live.feat))
            # levels a store left out are compared on the live teacher: only what was stored can differ
            stored.feats = {lvl: stored.feats.get(lvl, live_feats[lvl]) for lvl in teacher.info.levels}
        # the student's outputs as leaves: what it learns from a term is that term's gradient on them
        leaves: list = []
        preds = _as_leaves(preds, leaves)
        from_store = distiller(preds, stored)
        from_live = distiller(preds, TeacherBatch(split_head(live.head), live_feats))
        from_store["total"], from_live["total"] = sum(from_store.values()), sum(from_live.values())
        for key in from_live:
            a, b = float(from_store[key].detach()), float(from_live[key].detach())
            rel[key].append(abs(a - b) / max(abs(b), 1e-12))
            ga, gb = (torch.autograd.grad(x, leaves, retain_graph=True, allow_unused=True) if x.requires_grad else [None] * len(leaves)
                      for x in (from_store[key], from_live[key]))
            ga = [x if x is not None else torch.zeros_like(t) for x, t in zip(ga, leaves)]
            gb = [y if y is not None else torch.zeros_like(t) for y, t in zip(gb, leaves)]
            diff = sum(float((x - y).pow(2).sum()) for x, y in zip(ga, gb))
            norm = sum(float(y.pow(2).sum()) for y in gb)
            grad[key].append((diff / max(norm, 1e-24)) ** 0.5)
    out = {k: {"max": max(v), "mean": float(np.mean(v))} for k, v in rel.items() if v}
    for k, v in grad.items():  # |grad from the store - grad from the live teacher| / |grad from the live teacher|
        if v and k in out:
            out[k].update(grad_max=max(v), grad_mean=float(np.mean(v)))
    return out


def _read_rate(store: str) -> float:
    from softlabel.cache.reader import CacheReader

    reader = CacheReader(store)
    n = reader.layout.count
    reader.read("v0", 0)  # as the trainer reads: the stored arrays as they are
    t = time.perf_counter()
    for i in range(n):
        reader.read("v0", i)
    return n / (time.perf_counter() - t)


def _scaled(info: dict, opts: dict, imgsz: int, nc: int, reg_max: int, feat_values_here: int) -> tuple[float, float]:
    """Bytes per 640 px, 80-class YOLOv8x sample-view, from the bytes per stored value measured here."""
    per = info["bytes_per_sample_view"]
    head_ch = 4 * reg_max + nc
    anchors = sum((imgsz // s) ** 2 for s in (8, 16, 32))
    if opts.get("head_topk"):
        # the same scenes at 640 px cover proportionally more anchors: keep the kept share of anchors
        grow, wider = V8X_640["anchors"] / anchors, V8X_640["head_channels"] / head_ch
        slots = grow * (per.get("head/values", 0) * wider + per.get("head/index", 0))
        head = slots + per.get("head/scale", 0) * wider + per.get("head/background", 0) * V8X_640["nc"] / nc
    else:
        dense = sum(v for key, v in per.items() if key.startswith("head/")) / (anchors * head_ch)
        scales = sum(v for key, v in per.items() if key.startswith("head_scale/")) / (3 * head_ch)
        head = V8X_640["anchors"] * V8X_640["head_channels"] * dense + 3 * V8X_640["head_channels"] * scales
    feat_here = info["bytes_per_sample_view_total"]["feat"]
    feat = V8X_640["feat_values"] * feat_here / feat_values_here if feat_values_here else 0.0
    return head, feat


def _measure_store(args, work: Path, data_yaml: Path, teacher_pt: Path, kept: int, reg_max: int) -> dict:
    from softlabel.cache.info import summarize
    from softlabel.dump import DumpSettings, run_dump

    out = str(work / f"kept{kept}.zarr")
    t = time.perf_counter()
    done = run_dump(DumpSettings(teacher=str(teacher_pt), data=str(data_yaml), out=out, views=1, close_views=0,
                                 imgsz=640, batch=args.batch, workers=1, progress=False, **common.kept_dump_options(kept, reg_max)))
    dump_rate = done.samples_done / (time.perf_counter() - t)
    info = summarize(out)
    per, totals = info["bytes_per_sample_view"], info["bytes_per_sample_view_total"]
    other = sum(v for k, v in per.items() if not k.split("/")[0].split("_")[0] in ("head", "feat"))
    fidelity = _fidelity(out, teacher_pt, data_yaml, args.student, min(args.fidelity_samples, args.images))
    stats = common.kept_stats(out)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "kept_anchors": stats,  # per image, in this store
        "head_bytes_per_sample_view": totals["head"],
        "feat_bytes_per_sample_view": totals["feat"],
        "other_bytes_per_sample_view": other,  # fingerprints, done flags
        "total_bytes_per_sample_view": totals["head"] + totals["feat"] + other,
        "coco_train2017_4_views_bytes": COCO_IMAGES * COCO_VIEWS * (totals["head"] + totals["feat"] + other),
        # a random teacher's loss: the trained teacher's fidelity at 640 px is topk.py's
        "loss_rel_error": fidelity["total"]["max"],
        "loss_rel_error_per_term": fidelity,
        "host_bytes_per_sample_view": done.host_bytes_per_sample_view,
        "bytes_per_tensor": per,
        "dump_sample_views_per_sec": dump_rate,
        "measured": {"imgsz": 640, "nc": 80, "teacher": f"{args.teacher_cfg} (random weights, calibrated)", "images": args.images,
                     "dump_options": common.kept_dump_options(kept, reg_max) or "the dump's defaults", **common.header("cpu")},
    }


def measure_640(args) -> None:
    """The default store measured at 640 px, 80 classes: bytes on disk per tensor and per sample-view,
    bytes the dump copied from the teacher's device, for each number of kept anchors in --kept-640
    (the first is the typical image and becomes 'default', the others are reported beside it)."""
    import json

    reg_max = common.cfg_reg_max(args.teacher_cfg)
    from softlabel.dump import store_defaults

    kept = [int(k) for k in args.kept_640.split(",")] if args.kept_640 else [common.typical_kept(640, reg_max), store_defaults(reg_max).topk]
    work = Path(tempfile.mkdtemp(prefix="softlabel-storage640-"))
    try:
        data_yaml = common.make_data(work / "data", args.images, 1, 640, nc=80)
        teacher_pt, calibration = common.make_kept_teacher(args.teacher_cfg, data_yaml, work / "teacher.pt", 640, kept[0])
        stores = {k: _measure_store(args, work, data_yaml, teacher_pt, k, reg_max) for k in dict.fromkeys(kept)}
        for v in stores.values():
            v["teacher_calibration"] = calibration
    finally:
        shutil.rmtree(work, ignore_errors=True)
    default = stores[kept[0]]
    path = Path(args.out)
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.update(default=default, default_name=DUMP_DEFAULT, coco_train2017_4_views_bytes=default["coco_train2017_4_views_bytes"],
                   default_by_kept={str(k): v for k, v in stores.items()},
                   default_measured_at=f"640 px, 80 classes, measured, not scaled; the random teacher calibrated so that the "
                                       f"median image keeps {kept[0]} anchors (the mean a trained teacher kept under the "
                                       f"default rule for its head, {common.TOPK_RESULTS['bins' if reg_max > 1 else 'distances']}) and the dump's defaults")
    common.write_json(path, payload)
    tensors = sorted({t for v in stores.values() for t in v["bytes_per_tensor"]})
    rows = [[t] + [v["bytes_per_tensor"].get(t, 0) / 1e3 for v in stores.values()] for t in tensors]
    rows.append(["total"] + [v["total_bytes_per_sample_view"] / 1e3 for v in stores.values()])
    footer = []
    for k, v in stores.items():
        total, coco = v["total_bytes_per_sample_view"], v["coco_train2017_4_views_bytes"]
        footer.append(f"{k} kept (mean {v['kept_anchors']['mean']:.0f}, {v['kept_anchors']['min']}-{v['kept_anchors']['max']}): {total / 1e6:.4f} MB per sample-view ({common.verdict(total <= 0.1e6)} <= 0.1 MB), "
                      f"COCO train2017 x {COCO_VIEWS} views {coco / 1e9:.1f} GB ({common.verdict(coco <= 50e9)} <= 50 GB), "
                      f"copied from the teacher's device {v['host_bytes_per_sample_view'] / 1e6:.4f} MB, "
                      f"dump {v['dump_sample_views_per_sec']:.2f} sample-views/s")
    footer.append(f"written to {path}")
    print(common.table(["tensor"] + [f"kB, {k} kept" for k in stores], rows,
                       title=f"default store at 640 px, 80 classes, {args.teacher_cfg} (random weights, calibrated), {args.images} images",
                       footer=footer))


def main() -> None:
    args = parse_args()
    if args.at_640:
        return measure_640(args)
    from softlabel.cache.info import summarize
    from softlabel.dump import DumpSettings, run_dump
    from softlabel.teacher import load_model

    work = Path(tempfile.mkdtemp(prefix="softlabel-storage-"))
    try:
        if args.quick:
            data_yaml = common.make_data(work / "data", 24, 4, 64)
            teacher_pt = common.make_teacher("yolov8n.yaml", data_yaml, work / "teacher.pt")
            imgsz, args.images, args.fidelity_samples = 64, 24, 16
        else:
            teacher_pt, data_yaml, imgsz = _demo_inputs(args)
        subset = _subset(data_yaml, args.images, work)
        augment = args.augment
        if augment is None and not args.quick and (Path(args.demo_dir) / "cache.augment.yaml").is_file():
            augment = str(Path(args.demo_dir) / "cache.augment.yaml")
        _, info_t = load_model(teacher_pt)
        rows, results = [], {}
        for name in [o.strip() for o in args.options.split(",") if o.strip()]:
            opts = dict(OPTIONS[name])
            out = str(work / f"{name}.zarr")
            settings = DumpSettings(teacher=str(teacher_pt), data=str(subset), out=out, views=1, close_views=0, imgsz=imgsz,
                                    batch=args.batch, workers=1, progress=False, augment=augment, **opts)
            t = time.perf_counter()
            done = run_dump(settings)
            dump_rate = done.samples_done / (time.perf_counter() - t)
            info = summarize(out)
            feat_levels = opts.get("levels", info_t.levels)
            feat_values = sum(c * (imgsz // s) ** 2 for lvl, c, s in zip(info_t.levels, info_t.feature_channels, info_t.strides) if lvl in feat_levels)
            head640, feat640 = _scaled(info, opts, imgsz, info_t.nc, info_t.reg_max, feat_values)
            if "levels" in opts:  # fewer levels: scale by the share of values kept at 640 px as well
                share = sum(c * (imgsz // s) ** 2 for lvl, c, s in zip(info_t.levels, info_t.feature_channels, info_t.strides) if lvl in feat_levels)
                share /= sum(c * (imgsz // s) ** 2 for c, s in zip(info_t.feature_channels, info_t.strides))
                feat640 *= share
            fidelity = _fidelity(out, teacher_pt, subset, args.student, args.fidelity_samples)
            results[name] = {
                "dump_options": opts,
                "head_bytes_per_sample_view": head640,
                "feat_bytes_per_sample_view": feat640,
                "loss_rel_error": fidelity["total"]["max"],
                "loss_rel_error_mean": fidelity["total"]["mean"],
                "loss_rel_error_per_term": fidelity,
                "measured": {"imgsz": imgsz, "nc": info_t.nc, "bytes_per_sample_view": info["bytes_per_sample_view"],
                             "totals": info["bytes_per_sample_view_total"]},
                "dump_sample_views_per_sec": dump_rate,
                "read_samples_per_sec": _read_rate(out),
            }
            r = results[name]
            rows.append([name, info["bytes_per_sample_view_total"]["head"] / 1e3, info["bytes_per_sample_view_total"]["feat"] / 1e3,
                         head640 / 1e6, feat640 / 1e6, 100 * r["loss_rel_error"], 100 * r["loss_rel_error_mean"],
                         dump_rate, r["read_samples_per_sec"]])
            shutil.rmtree(out, ignore_errors=True)
        # feature-level selection changes what is distilled, not how faithfully: judged by mAP, not chosen here
        passing = {k: v for k, v in results.items() if v["loss_rel_error"] <= LOSS_LIMIT and "levels" not in v["dump_options"]}
        best_name = min(passing, key=lambda k: (results[k]["head_bytes_per_sample_view"] > HEAD_LIMIT,
                                                results[k]["head_bytes_per_sample_view"] + results[k]["feat_bytes_per_sample_view"])) if passing else None
        default_name = DUMP_DEFAULT if DUMP_DEFAULT in results else best_name
        default = results.get(default_name, {})
        coco = None
        if default:
            coco = COCO_IMAGES * COCO_VIEWS * (default["head_bytes_per_sample_view"] + default["feat_bytes_per_sample_view"])
        payload = {
            **common.header("cpu"),
            "teacher": str(teacher_pt),
            "data": str(data_yaml),
            "images": args.images,
            "imgsz": imgsz,
            "scaled_to": "640 px, 80 classes, YOLOv8x (8400 anchors; feature channels 320/640/640)",
            "default_name": default_name,
            "smallest_passing": best_name,
            "default": {k: default.get(k) for k in ("head_bytes_per_sample_view", "feat_bytes_per_sample_view", "loss_rel_error")},
            "options": results,
            "coco_train2017_4_views_bytes": coco,
            "targets": {"head_bytes_per_sample_view": HEAD_LIMIT, "loss_rel_error": LOSS_LIMIT},
        }
        path = common.write_json(args.out, payload)
        footer = [f"smallest head + features with loss error <= {LOSS_LIMIT:.0%}, all feature levels: {best_name}; "
                  f"the dump's default: {default_name}"]
        if coco:
            footer.append(f"COCO train2017 x {COCO_VIEWS} views with it: {coco / 1e12:.2f} TB "
                          f"(head {default['head_bytes_per_sample_view'] / 1e6:.3f} MB {common.verdict(default['head_bytes_per_sample_view'] <= HEAD_LIMIT)} "
                          f"<= 0.3 MB, + features {default['feat_bytes_per_sample_view'] / 1e6:.2f} MB per sample-view)")
        footer.append(f"results: {path}")
        print(common.table(
            ["option", "head kB", "feat kB", "head MB@640", "feat MB@640", "loss err max %", "mean %", "dump/s", "read/s"],
            rows, title=f"storage options ({args.images} images at {imgsz} px, teacher {Path(teacher_pt).name}; MB@640 = scaled to YOLOv8x, 80 classes)",
            footer=footer,
        ))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
