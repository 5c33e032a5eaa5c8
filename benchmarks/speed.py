"""Student training cost: plain Ultralytics vs softlabel offline (cache) vs online (live teacher) vs
Ultralytics' built-in distillation, on the same student, data, image size, batch, epochs and seed.

The one-time cost of the cache (the dump) is timed separately, and the number of student runs after
which it pays for itself against each live-teacher mode is reported.

Seconds per epoch come from each run's results.csv, whose `time` column is cumulative seconds since
training started, written after each epoch. The first epoch (warm-up, first-batch overheads) and the
last one (it always validates, even with val=False) are left out:

    sec_per_epoch = (time[epochs-2] - time[0]) / (epochs - 2)      (needs --epochs >= 3)

Per-epoch checkpoints are off (save=False), so the measured epochs are training steps only.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

import common
import torch

MODES = ["plain", "offline", "online", "ultralytics"]
TARGETS = {"offline_over_plain": ("<=", 1.05), "ultralytics_over_offline": (">=", 3.0)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default sizes take about 10 minutes on 2 CPU cores. GPU run: --device 0 --imgsz 640 --batch 16 --images 512",
    )
    p.add_argument("--images", type=int, default=48, help="training images in the generated toy dataset (default: 48)")
    p.add_argument("--nc", type=int, default=3, help="classes the data.yaml names (80: COCO's names, the operating point; default: 3)")
    p.add_argument("--val-images", type=int, default=4, help="validation images; only the final epoch validates (default: 4)")
    p.add_argument("--imgsz", type=int, default=160, help="image size of teacher and students, multiple of 32 (default: 160)")
    p.add_argument("--batch", type=int, default=8, help="batch size for training and for the dump; nbs is set to it (default: 8)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per student run, at least 3 (default: 4)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the four modes; medians are reported (default: 3)")
    p.add_argument("--views", type=int, default=1, help="mosaic views in the cache, cycled the same way online (default: 1)")
    p.add_argument("--student", default="yolov8n.yaml", help="student model yaml (default: yolov8n.yaml)")
    p.add_argument("--teacher-cfg", default=None, help="teacher model yaml, built with random weights and calibrated (--kept) (default: yolov8x.yaml; yolov8n.yaml with --quick)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 1, ... for teacher and students; AMP is used on CUDA only (default: cpu)")
    p.add_argument("--workers", type=int, default=2, help="training DataLoader workers; Ultralytics uses 0 on CPU (default: 2)")
    p.add_argument("--dump-workers", type=int, default=1, help="DataLoader workers replaying augmentations for the dump (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="training and augmentation seed (default: 0)")
    p.add_argument("--distill", default=None, help="distillation config for offline and online (a built-in name or a YAML path; default: default)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    common.add_kept_arg(p)
    p.add_argument("--out", default=str(common.RESULTS / "speed.json"), help="result JSON (default: benchmarks/results/speed.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, teacher, cache, runs) and print its path")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 images at imgsz 64, 3 epochs, 1 repeat, yolov8n teacher (~1 minute)")
    args = p.parse_args()
    if args.quick:
        args.images, args.val_images, args.imgsz, args.batch, args.epochs, args.repeats = 16, 2, 64, 8, 3, 1
        args.teacher_cfg = args.teacher_cfg or "yolov8n.yaml"
    args.teacher_cfg = args.teacher_cfg or "yolov8x.yaml"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {MODES}")
    if args.epochs < 3:
        p.error("--epochs must be at least 3: the first and the last epoch are not timed")
    return args


def epoch_seconds(results_csv: Path, epochs: int) -> float:
    with open(results_csv) as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    if len(rows) != epochs:
        raise RuntimeError(f"{results_csv}: {len(rows)} epoch rows, expected {epochs}")
    times = [float(r["time"]) for r in rows]
    return (times[epochs - 2] - times[0]) / (epochs - 2)


def train_once(mode: str, args, ctx: dict, project: Path, name: str) -> dict:
    from ultralytics import YOLO

    from softlabel.train import make_trainer

    extra: dict = {}
    if mode == "offline":
        extra["trainer"] = make_trainer(cache=str(ctx["store"]), distill_config=args.distill)
    elif mode == "online":
        extra["trainer"] = make_trainer(teacher_path=str(ctx["teacher"]), views=args.views, close_views=0, replay_seed=args.seed,
                                        distill_config=args.distill)
    elif mode == "ultralytics":
        extra["distill_model"] = str(ctx["teacher"])
    model = YOLO(args.student, task="detect")
    with common.Timer() as t:
        model.train(
            data=str(ctx["data"]), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, nbs=args.batch,
            device=args.device, workers=args.workers, seed=args.seed,
            close_mosaic=0,  # same schedule in every mode; the cache then needs no closing views
            val=False, plots=False, save=False, amp=ctx["cuda"], verbose=False,
            project=str(project), name=name, exist_ok=True, **extra,
        )
    spe = epoch_seconds(Path(model.trainer.save_dir) / "results.csv", args.epochs)
    return {"sec_per_epoch": spe, "images_per_sec": args.images / spe, "run_seconds": t.seconds}


def main() -> None:
    args = parse_args()
    from softlabel.dump import DumpSettings, resolve_device, run_dump

    cuda = resolve_device(args.device).type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="softlabel-speed-"))
    try:
        data = common.make_data(tmp / "data", args.images, args.val_images, args.imgsz, seed=args.seed, nc=args.nc)
        teacher, calibration = common.make_kept_teacher(args.teacher_cfg, data, tmp / "teacher.pt", args.imgsz, args.kept, args.device)
        store = tmp / "cache.zarr"
        ctx = {"data": data, "teacher": teacher, "store": store, "cuda": cuda}

        # the one-time cost: one teacher pass over every view, written to the cache
        settings = DumpSettings(teacher=str(teacher), data=str(data), out=str(store), views=args.views, close_views=0,
                                imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.dump_workers,
                                seed=args.seed, progress=False, **common.kept_dump_options(args.kept, common.cfg_reg_max(args.teacher_cfg)))
        with common.Timer() as t:
            run_dump(settings)
        dump_seconds = t.seconds
        kept = common.kept_stats(str(store)) if settings.head_topk else None
        threads = {"dump": torch.get_num_threads()}
        print(f"dump: {dump_seconds:.1f} s for {args.images * args.views} sample-views", flush=True)

        runs = {m: [] for m in args.modes}
        for r in range(args.repeats):  # interleaved, so a slow spell on a shared machine hits every mode alike
            for mode in args.modes:
                res = train_once(mode, args, ctx, tmp / "runs" / mode, f"r{r}")
                runs[mode].append(res)
                threads["train"] = torch.get_num_threads()  # Ultralytics sets its own on CPU
                print(f"repeat {r + 1}/{args.repeats} {mode:<12} {res['sec_per_epoch']:.2f} s/epoch "
                      f"({res['run_seconds']:.1f} s run)", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    modes = {
        m: {
            "sec_per_epoch": common.median([x["sec_per_epoch"] for x in rs]),
            "images_per_sec": common.median([x["images_per_sec"] for x in rs]),
        }
        for m, rs in runs.items()
    }
    per_repeat = {m: {k: [x[k] for x in rs] for k in ("sec_per_epoch", "images_per_sec", "run_seconds")} for m, rs in runs.items()}

    def ratio(a: str, b: str) -> float | None:
        return modes[a]["sec_per_epoch"] / modes[b]["sec_per_epoch"] if a in modes and b in modes else None

    ratios = {
        "offline_over_plain": ratio("offline", "plain"),
        "online_over_offline": ratio("online", "offline"),
        "ultralytics_over_offline": ratio("ultralytics", "offline"),
    }

    # break-even: student runs (of --epochs epochs) after which the dump has cost less than the live teacher
    def break_even(mode: str) -> float | None:
        if mode not in modes or "offline" not in modes:
            return None
        saved = (modes[mode]["sec_per_epoch"] - modes["offline"]["sec_per_epoch"]) * args.epochs
        return common.finite_or_none(dump_seconds / saved) if saved > 0 else None

    result = {
        **common.header(args.device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "timing": "sec_per_epoch = (results.csv time[epochs-2] - time[0]) / (epochs-2): first and last (validating) epochs excluded",
        "modes": modes,
        "per_repeat": per_repeat,
        "ratios": ratios,
        "dump_seconds": dump_seconds,
        "kept_anchors": kept,  # per image, in the store the offline runs read
        "teacher_calibration": calibration,
        "torch_threads": threads,
        "break_even_runs": {"online": break_even("online"), "ultralytics": break_even("ultralytics")},
        # a ratio whose modes were not run (--modes) is not measured: pass is None, not False
        "targets": {k: {"op": op, "value": v, "pass": None if ratios[k] is None else _meets(ratios[k], op, v)}
                    for k, (op, v) in TARGETS.items()},
    }
    out = common.write_json(args.out, result)

    rows = []
    for m in modes:
        rows.append([m, modes[m]["sec_per_epoch"], modes[m]["images_per_sec"], ratio(m, "offline"),
                     " ".join(f"{s:.2f}" for s in per_repeat[m]["sec_per_epoch"])])
    be = result["break_even_runs"]
    footer = [
        f"dump (one-time cost): {dump_seconds:.1f} s; break-even vs online: {_runs(be['online'], 'online' in modes)}, "
        f"vs ultralytics: {_runs(be['ultralytics'], 'ultralytics' in modes)} student runs of {args.epochs} epochs",
    ]
    for k, (op, v) in TARGETS.items():
        ok = result["targets"][k]["pass"]
        footer.append(f"{'----' if ok is None else common.verdict(ok)}  {k} = {_fmt(ratios[k])} (target {op} {v})"
                      + (" not measured: a mode it compares was not run" if ok is None else ""))
    footer += [
        f"torch threads: dump {threads['dump']}, training {threads.get('train', '-')} (Ultralytics' choice on CPU)",
        f"written to {out}",
    ]
    title = (f"student {args.student}, teacher {args.teacher_cfg} (random weights{', calibrated' if calibration else ''}), {args.images} images at imgsz {args.imgsz}, "
             f"batch {args.batch}, {args.epochs} epochs, medians of {args.repeats}, device {args.device}")
    print()
    print(common.table(["mode", "s/epoch", "images/s", "x offline", "per repeat s/epoch"], rows, title, footer))


def _meets(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _runs(x: float | None, ran: bool = True) -> str:
    if not ran:
        return "not run"
    return "never (no saving)" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
