"""Compression on top of distillation: pruning, recovery with and without the cache, and INT8.

Rows, each measured the same way (parameters, GFLOPs at imgsz, mAP50 and mAP50-95 on the val split,
median CPU latency of one single-image prediction with pre/post-processing, file size):

  original        --model as given (by default the demo's plainly trained student)
  distilled       --distilled (by default the demo's distilled student); without one, --model
                  fine-tuned with distillation from the cache for --epochs
  pruned          --model pruned at --ratio, no training
  pruned+ft       pruned, fine-tuned --epochs with the detection loss only
  pruned+distill  pruned, fine-tuned --epochs with distillation from the cache
  best ONNX FP32  the pruned row with the best mAP50-95, exported to ONNX
  best ONNX INT8  the same, INT8 calibrated on the training split (softlabel export)

The PyTorch rows run in PyTorch, the last two in ONNX Runtime. Both fine-tunes share the recipe
(optimizer, lr0, batch, flips) of the demo when its results.json is found, and Ultralytics'
defaults otherwise. Default inputs: runs/demo (python -m softlabel demo) when it has a results.json.

    python benchmarks/compress.py                      # the demo run's models, cache and data
    python benchmarks/compress.py --teacher-cache c.zarr --data d.yaml --model best.pt --epochs 10
    python benchmarks/compress.py --quick              # smoke test on toy data, tiny untrained models
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import common

DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="original model checkpoint (default: the demo's plain student)")
    p.add_argument("--distilled", default=None, help="distilled model checkpoint (default: the demo's distilled student)")
    p.add_argument("--teacher-cache", default=None, help="cache written by softlabel dump (default: the demo's cache.zarr)")
    p.add_argument("--data", default=None, help="data.yaml the cache was dumped from (default: the demo's)")
    p.add_argument("--demo", default=str(DEMO), help=f"demo run folder supplying the defaults (default: {DEMO})")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of channels pruned from every layer (default: 0.3)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the demo's student epochs, or 10)")
    p.add_argument("--batch", type=int, default=None, help="fine-tuning batch size (default: the demo's, or 16)")
    p.add_argument("--distill-config", default=None, help="distillation config YAML (default: the demo's, or the default config)")
    p.add_argument("--calib-images", type=int, default=300, help="training images for INT8 calibration (default: 300)")
    p.add_argument("--runs", type=int, default=50, help="timed predictions per row; the median is reported (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (default: 0)")
    p.add_argument("--work", default=None, help="folder for the pruned model, fine-tuning runs and exports (default: a temporary one)")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/compress.json; --quick: compress-quick.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: toy data, untrained yolov8n at imgsz 64, 1 epoch (~2 minutes)")
    args = p.parse_args()
    if not 0 < args.ratio < 1:
        p.error("--ratio must be between 0 and 1")
    args.out = args.out or str(common.RESULTS / ("compress-quick.json" if args.quick else "compress.json"))
    return args


def demo_defaults(args) -> dict:
    """Fill unset inputs from the demo's results.json; return the demo's training recipe (or {})."""
    results = Path(args.demo) / "results.json"
    if not results.is_file():
        return {}
    demo = json.loads(results.read_text())
    run = Path(demo.get("run_dir") or args.demo)

    def weights(role: str) -> str | None:
        row = (demo.get("students") or {}).get(role) or {}
        path = Path(row.get("weights") or "")
        return str(path) if path.is_file() else None

    args.model = args.model or weights("plain")
    args.distilled = args.distilled or weights("distilled")
    args.teacher_cache = args.teacher_cache or str(run / "cache.zarr")
    args.data = args.data or str(run / "data" / "data.yaml")
    settings = demo.get("settings") or {}
    args.epochs = args.epochs or settings.get("epochs")
    args.distill_config = args.distill_config or settings.get("distill")
    return demo.get("recipe") or {}


def quick_inputs(args, tmp: Path) -> dict:
    """Toy data, an untrained yolov8n teacher and its cache, an untrained yolov8n 'original'."""
    from softlabel.dump import DumpSettings, run_dump

    data = common.make_data(tmp / "data", 16, 4, 64)
    teacher = common.make_teacher("yolov8n.yaml", data, tmp / "teacher.pt")
    store = tmp / "cache.zarr"
    run_dump(DumpSettings(teacher=str(teacher), data=str(data), out=str(store), views=1, close_views=0, imgsz=64, batch=8,
                          progress=False))
    args.model = str(common.make_teacher("yolov8n.yaml", data, tmp / "original.pt"))
    args.distilled, args.teacher_cache, args.data = None, str(store), str(data)
    args.epochs, args.batch, args.runs, args.calib_images = 1, 8, 5, 8
    return {}


def seam_trainers(cache: str, distill_config: str | None):
    """Trainers that keep a pruned student's own layers (Ultralytics would rebuild it at full width from its yaml)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from softlabel.prune import pruned_model_or_none
    from softlabel.train import DistillTrainer

    def get_model(self, cfg=None, weights=None, verbose=True):
        pruned = pruned_model_or_none(weights, self.data["nc"])
        return pruned if pruned is not None else self._rebuild(cfg, weights, verbose)

    plain = type("PrunedPlainTrainer", (DetectionTrainer,), {"get_model": get_model, "_rebuild": DetectionTrainer.get_model})
    distill = type("PrunedDistillTrainer", (DistillTrainer,), {
        "get_model": get_model, "_rebuild": DistillTrainer.get_model, "cache": cache, "distill_config": distill_config,
    })
    return plain, distill


def fine_tune(weights: str, trainer, args, recipe: dict, imgsz: int, close_mosaic: int, project: Path, name: str) -> str:
    from ultralytics import YOLO

    shutil.rmtree(project / name, ignore_errors=True)
    train = dict(epochs=args.epochs, imgsz=imgsz, batch=args.batch, nbs=args.batch, device="cpu", workers=0, seed=args.seed,
                 deterministic=True, close_mosaic=close_mosaic, plots=False, project=str(project), name=name, exist_ok=True)
    for key in ("optimizer", "lr0", "warmup_epochs", "fliplr"):
        if key in recipe:
            train[key] = recipe[key]
    model = YOLO(weights)
    model.train(data=args.data, trainer=trainer, **train)
    best = Path(model.trainer.save_dir) / "weights" / "best.pt"
    return str(best if best.is_file() else Path(model.trainer.save_dir) / "weights" / "last.pt")


def measure(role: str, path: str, args, imgsz: int, image: Path, val_dir: Path, params_of: str | None = None) -> dict:
    """One table row; exported files take params and GFLOPs from the checkpoint they came from."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    from softlabel.export import measure_latency, size_mb, validate

    model = YOLO(params_of or path).model
    map50, map50_95 = validate(path, args.data, imgsz, val_dir, role.replace(" ", "-"))
    row = {"role": role, "path": path, "params": int(get_num_params(model)), "gflops": float(get_flops(model, imgsz)),
           "map50": map50, "map50_95": map50_95, "latency_ms": measure_latency(path, image, imgsz, args.runs),
           "size_mb": size_mb(path)}
    print(f"{role:<16} mAP50-95 {map50_95:.3f}  {row['latency_ms']:.1f} ms  {row['size_mb']:.2f} MB", flush=True)
    return row


def main() -> None:
    args = parse_args()
    from softlabel.cache.store import read_attrs
    from softlabel.export import export_all, first_val_image
    from softlabel.prune import prune_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="softlabel-compress-"))
    work = Path(args.work).resolve() if args.work else tmp / "work"
    try:
        recipe = quick_inputs(args, tmp) if args.quick else demo_defaults(args)
        missing = [k for k in ("model", "teacher_cache", "data") if not getattr(args, k)]
        if missing:
            raise SystemExit(f"no {', '.join('--' + k.replace('_', '-') for k in missing)} given and no demo run at {args.demo}")
        args.epochs = args.epochs or 10
        args.batch = args.batch or int(recipe.get("batch") or 16)
        attrs = read_attrs(args.teacher_cache)
        imgsz = int(attrs["augment"]["imgsz"])
        # the last epochs replay closing views: only when the cache has them
        close_mosaic = min(int(recipe.get("close_mosaic", 0)), args.epochs - 1) if int(attrs["augment"]["close_views"]) else 0
        image = first_val_image(args.data)
        val_dir = work / "val"
        plain_trainer, distill_trainer = seam_trainers(args.teacher_cache, args.distill_config)

        rows = [measure("original", args.model, args, imgsz, image, val_dir)]
        distilled = args.distilled or fine_tune(args.model, distill_trainer, args, recipe, imgsz, close_mosaic, work, "distilled")
        rows.append(measure("distilled", distilled, args, imgsz, image, val_dir))
        pruned = prune_checkpoint(args.model, work / "pruned.pt", args.ratio, imgsz=imgsz).out
        rows.append(measure("pruned", pruned, args, imgsz, image, val_dir))
        ft = fine_tune(pruned, plain_trainer, args, recipe, imgsz, close_mosaic, work, "pruned-ft")
        rows.append(measure("pruned+ft", ft, args, imgsz, image, val_dir))
        kd = fine_tune(pruned, distill_trainer, args, recipe, imgsz, close_mosaic, work, "pruned-distill")
        rows.append(measure("pruned+distill", kd, args, imgsz, image, val_dir))

        best = max(rows[-2:], key=lambda r: r["map50_95"])
        exported = export_all(best["path"], "onnx", work / "onnx", imgsz, True, args.data, args.calib_images)
        for precision, path in exported.items():
            rows.append(measure(f"best ONNX {precision.upper()}", str(path), args, imgsz, image, val_dir, params_of=best["path"]))
    finally:
        if not args.work:
            shutil.rmtree(tmp, ignore_errors=True)

    title = (f"compression of {Path(args.model).name}: prune {args.ratio:g} per layer, {args.epochs} fine-tuning epochs, "
             f"INT8 of the best pruned row ({best['role']}), imgsz {imgsz}" + (" (QUICK: numbers mean nothing)" if args.quick else ""))
    headers = ["model", "params", "GFLOPs", "mAP50", "mAP50-95", "CPU ms/img", "size MB"]
    body = [[r["role"], r["params"], r["gflops"], r["map50"], r["map50_95"], r["latency_ms"], r["size_mb"]] for r in rows]
    footer = [f"CPU ms/img: median of {args.runs} single-image predictions (pre/post-processing included); "
              f"PyTorch rows in PyTorch, ONNX rows in ONNX Runtime; mAP on the val split of {args.data}",
              f"every row on square {imgsz}x{imgsz} letterboxed inputs (rect=False), as the exported models need"]
    result = {
        **common.header("cpu"),
        "title": title, "quick": args.quick,
        "settings": {"model": args.model, "distilled": args.distilled, "teacher_cache": args.teacher_cache, "data": args.data,
                     "ratio": args.ratio, "epochs": args.epochs, "batch": args.batch, "imgsz": imgsz, "seed": args.seed,
                     "close_mosaic": close_mosaic, "distill_config": args.distill_config, "recipe": recipe,
                     "calib_images": args.calib_images, "latency_runs": args.runs},
        "rows": rows,
    }
    out = common.write_json(args.out, result)
    print(common.table(headers, body, title=title, footer=footer))
    print(f"written {out}")


if __name__ == "__main__":
    main()
