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
The trees preset uses aerial tree crowns instead (benchmarks/trees.py): 256 px tiles of the annotated images
in the deepforest wheel, split by source image; install them with `pip install --no-deps deepforest==2.1.0`.
The data, teacher and cache are kept in --work and reused by a later run with the same settings.

Every run validates after each epoch; the JSON keeps the curves (curves[mode][seed]: val mAP50-95 per
epoch) and says whether plain training's curve had flattened: its seed-mean gained less than 0.01 over
the last 20% of epochs.

Regimes (--preset converged / finetune / trees; -quick variants are smoke tests):
  converged  from scratch, long enough for plain training to flatten, Ultralytics' nbs (64).
  finetune   the student starts from a plain pretraining on a source task that shares no digit image
             with the target: scenes of digits 0-4 (source) against scenes of digits 5-9 (target), same
             scene settings otherwise. That is how users start from yolov8n.pt: features learnt elsewhere,
             then every mode (plain, offline, online, ultralytics) fine-tunes that same checkpoint on the
             target scenes, against a teacher trained on the target scenes. Both tasks have 5 classes,
             so the pretrained classification layer transfers too (with a meaningless class mapping, which
             fine-tuning has to unlearn; yolov8n.pt onto a non-80-class task would drop that layer).
             The pretraining runs once per settings and is reused, as the teacher is.
             The teacher starts the same way (--teacher-pretrain-epochs): pretrained plainly on the source
             scenes, then trained on the target's, as users fine-tune yolov8x.pt into their teacher. A
             teacher trained on the 200 target scenes from scratch (nbs 64) reached 0.164 mAP50-95, below
             every fine-tuned student (0.175-0.189), and no mode could gain from it (2-core machine,
             2026-12-03, accuracy-finetune.json at commit fd4d9e7).
  trees      converged's regime on real data: 74 aerial 256 px tiles of tree crowns (one class, benchmarks/trees.py),
             val on 16 tiles of another plot 13 km away; nbs 16, fliplr 0.5.

Studies (any preset):
  --storage-ablation  one more offline run per seed, on the same views, from a dense float16 store (every
                      anchor of the head, whole feature maps): mode `offline-dense`. Against `offline`
                      (the default store) and `online` it splits the offline-online gap into what storage
                      costs and what the rest (views) costs.
  --views-study 2,4,8 offline runs per seed from caches of K mosaic views each. Per K: final mAP50-95,
                      curves and a fitting signal. Fitting the cache shows as the distillation loss on
                      the training views still falling while val mAP no longer rises. On the seed-mean
                      curves of the mosaic epochs (closing epochs excluded, they replay other views):
                      fit_epoch is the first epoch e after which val mAP50-95 (3-epoch running mean)
                      gains less than 0.01 while the summed distillation loss still falls by more than
                      10%; null when that never happens. fit_replays = fit_epoch / K, how often each
                      view had been seen by then.
"""

from __future__ import annotations

import argparse
import statistics
import dataclasses
from dataclasses import asdict
import time
from pathlib import Path

import common

MODES = ["plain", "offline", "online", "ultralytics"]
MAP = "metrics/mAP50-95(B)"
KD_TERMS = ("train/kd_cls", "train/kd_box", "train/kd_feat")
DENSE_STORAGE = {"precision": "float16", "head_topk": 0, "feature_layout": "dense"}
TAIL = 10  # epochs at the end of a run averaged by tail_mean
FLAT_SHARE, FLAT_GAIN = 0.2, 0.01  # flattened: the last 20% of epochs gain less than 0.01 mAP50-95
SOURCE_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)  # finetune regime: no digit image in common

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
    # converged and finetune: one full run (4 modes x 3 seeds, teacher training and dump included) is sized for
    # 90 minutes on 2 CPU cores. Basis, a timed run at this size (imgsz 64, 200 train / 50 val scenes, batch 16,
    # nbs 64, 4 epochs, seed 0) on a 2-core machine shared with another training (load about 3.8): seconds per
    # epoch, validation included, plain 2.1, offline 2.0, online 2.8, ultralytics 2.5 (9.5 for the four);
    # yolov8s teacher 6.4; the dump of 8 + 1 views 23 s; about 8 s per run outside its epochs.
    #   converged: teacher 100 x 6.4 = 640 s, dump 23 s, students 3 seeds x 120 epochs x 9.5 s = 3,420 s,
    #              12 x 8 s = 96 s: about 70 minutes. --storage-ablation adds 3 x 120 x 2.0 s + a dump, about
    #              13 minutes (83 in all). --views-study 2,4,8 runs apart: --modes offline --views-study 2,4,8
    #              with the same --work (teacher and caches reused): 3 x 3 x 120 x 2.0 s, about 36 minutes.
    #   finetune:  pretraining 100 x 2.1 = 210 s, teacher pretraining 640 s and teacher 640 s, dump 23 s,
    #              students 3 x 100 x 9.5 = 2,850 s, 96 s: about 75 minutes (the student's pretraining and the
    #              teacher's are each reused by a later run with the same --work).
    # Smaller scenes (64 px, digits 8-25 px) buy the epochs: from scratch, 120 epochs of 200 scenes are about
    # 390 optimizer steps of 64 images. Whether plain has flattened is measured, not assumed: the JSON says.
    # Ultralytics' defaults where the older presets chose otherwise: nbs 64, close_mosaic 10.
    # converged's teacher trains with nbs 16: with nbs 64 (3 optimizer steps an epoch on 200 scenes) a yolov8s
    # reached 0.037 mAP50-95 after 100 epochs, below the plain yolov8n student's 0.07 (2-core machine, 2026-12-03)
    "converged": dict(regime="scratch", device="cpu", imgsz=64, train_scenes=200, val_scenes=50, batch=16, nbs=64,
                      teacher_nbs=16, epochs=120, teacher_epochs=100, views=8, close_mosaic=10, seeds=[0, 1, 2], lr0=0.002, reuse_students=[]),
    "finetune": dict(regime="finetune", device="cpu", imgsz=64, train_scenes=200, val_scenes=50, batch=16, nbs=64,
                     teacher_nbs=16, epochs=100, teacher_epochs=100, pretrain_epochs=100, teacher_pretrain_epochs=100,
                     views=8, close_mosaic=10, seeds=[0, 1, 2], lr0=0.002, reuse_students=[]),
    # smoke tests of the two regimes' plumbing: numbers mean nothing
    "converged-quick": dict(regime="scratch", device="cpu", imgsz=64, train_scenes=16, val_scenes=8, batch=8, nbs=64,
                            epochs=3, teacher_epochs=2, views=2, close_mosaic=1, seeds=[0, 1], lr0=0.002, reuse_students=[]),
    "finetune-quick": dict(regime="finetune", device="cpu", imgsz=64, train_scenes=16, val_scenes=8, batch=8, nbs=64,
                           epochs=2, teacher_epochs=2, pretrain_epochs=2, teacher_pretrain_epochs=2, views=2, close_mosaic=1,
                           seeds=[0, 1], lr0=0.002, reuse_students=[]),
    # trees: the converged regime on real data (benchmarks/trees.py), every tile at its own size (imgsz 256); train_scenes
    # and val_scenes cap the tiles per split (0: all, 74 and 16). Aerial crowns have no handedness: fliplr 0.5.
    # nbs 16 for student and teacher alike: with nbs 64, 74 tiles make about one optimizer step an epoch, 120 in all.
    # Basis, plain yolov8n at these settings, 5 epochs (seed 0) on a 2-core machine shared with other jobs (load about
    # 10, yet the run held a whole core: Ultralytics trains with one thread on 2 cores, and its CPU time matched its
    # wall time): 5.6-6.1 s per epoch after the first (7.0 s), validation included; yolov8s teacher 16 s per epoch.
    #   one student run of 100 epochs: about 100 x 5.8 s, 10 minutes (online and ultralytics run the teacher too, and
    #   take longer); the teacher 200 x 16 s, about 55 minutes, trained once and reused by a later run with the same --work.
    # The teacher trains 200 epochs: after 100 a yolov8s (0.102 mAP50-95 at its best epoch) was below the plain yolov8n
    # student (0.109, seed 0), its training loss still falling (2-core machine, 2026-12-05).
    "trees": dict(regime="scratch", dataset="trees", device="cpu", imgsz=256, train_scenes=0, val_scenes=0, batch=8, nbs=16,
                  epochs=100, teacher_epochs=200, views=8, close_mosaic=10, seeds=[0, 1, 2], lr0=0.002, fliplr=0.5,
                  reuse_students=[]),
    "trees-quick": dict(regime="scratch", dataset="trees", device="cpu", imgsz=256, train_scenes=8, val_scenes=4, batch=8,
                        nbs=16, epochs=2, teacher_epochs=2, views=2, close_mosaic=1, seeds=[0, 1], lr0=0.002, fliplr=0.5,
                        reuse_students=[]),
}
# what a preset leaves unsaid: the older presets' behaviour
PRESET_DEFAULTS = dict(regime="scratch", dataset="digits", nbs=None, teacher_nbs=None, pretrain_epochs=None, teacher_pretrain_epochs=0,
                       reuse_students=["yolo11n"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu", help="sizes and device (default: gpu)")
    p.add_argument("--quick", action="store_true", help="a smoke test, numbers mean nothing: --preset quick, or with "
                   "--preset converged/finetune/trees their -quick variant")
    p.add_argument("--data", default=None, help="Ultralytics data.yaml (default: the digits scenes, or with --preset trees "
                   "the tree tiles, built in --work/data)")
    p.add_argument("--work", default=None, help="folder for data, teacher, cache and runs (default: runs/accuracy-PRESET)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint to use instead of training --teacher-model")
    p.add_argument("--teacher-model", default="yolov8s", help="teacher architecture to train (default: yolov8s)")
    p.add_argument("--student", default="yolov8n", help="student architecture of the four-way comparison (default: yolov8n)")
    p.add_argument("--reuse-students", nargs="*", default=None,
                   help="further students trained against the same cache (default: yolo11n; none in converged/finetune)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds, one run per mode and seed (preset: 0 1 2)")
    p.add_argument("--reuse-seeds", nargs="+", type=int, default=None, help="seeds for the reuse students (default: the first seed)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES, help="modes to run (default: all four)")
    p.add_argument("--distill", default=None, help="softlabel distillation config, a built-in name or a YAML path (default: default)")
    for name in ("epochs", "teacher_epochs", "imgsz", "batch", "views", "close_mosaic", "train_scenes", "val_scenes"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--lr0", type=float, default=None, help="initial learning rate, AdamW (preset: 0.002)")
    p.add_argument("--teacher-nbs", type=int, default=None, help="nominal batch size of the teacher's training (default: --nbs; "
                   "16, the batch, in converged: the teacher is an input of the comparison, trained to be good)")
    p.add_argument("--nbs", type=int, default=None, help="nominal batch size, images per optimizer step (default: the batch; 64, "
                   "Ultralytics' own, in converged/finetune)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="finetune regime: epochs of the student's plain pretraining")
    p.add_argument("--teacher-pretrain-epochs", type=int, default=None, help="finetune regime: epochs of the teacher's plain "
                   "pretraining on the source task before its --teacher-epochs on the target (preset: 100; 0: from scratch)")
    p.add_argument("--pretrained", default=None, help="finetune regime: the student checkpoint to fine-tune instead of pretraining one")
    p.add_argument("--source-data", default=None, help="finetune regime with --data: the data.yaml to pretrain on")
    p.add_argument("--storage-ablation", action="store_true", help="also train offline from a dense float16 store (mode offline-dense)")
    p.add_argument("--views-study", default=None, help="comma-separated view counts K: offline runs from a cache of K mosaic views each")
    p.add_argument("--fliplr", type=float, default=None, help="horizontal flip probability (default: 0 on digits, 0.5 on --data)")
    p.add_argument("--device", default=None, help="cpu, 0, cuda:N (preset: 0 for gpu, cpu otherwise)")
    p.add_argument("--precision", default=None, choices=["float16", "bfloat16", "int8"],
                   help="cache precision, as softlabel dump --precision (default: the dump's default)")
    p.add_argument("--head-topk", type=int, default=None, help="sparse head: anchors kept per image, as softlabel dump --head-topk")
    p.add_argument("--features", choices=["sparse", "dense"], default=None, help="feature layout, as softlabel dump --features")
    p.add_argument("--teacher-branch", choices=["one2many", "one2one", "mean"], default=None,
                   help="end-to-end teacher: the branch cached, as softlabel dump --teacher-branch (default: one2many)")
    p.add_argument("--head-floor", type=float, default=None, help="sparse head: minimum teacher score, as softlabel dump --head-floor")
    p.add_argument("--feature-rows", type=int, default=None,
                   help="sparse features: feature vectors kept per image, as softlabel dump --feature-rows")
    p.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/accuracy.json, accuracy-converged.json, "
                   "accuracy-finetune.json or accuracy-trees.json by preset, -views added with --views-study; WORK/result.json for the -quick variants); "
                   "the plot goes beside it")
    args = p.parse_args()
    if args.quick:
        args.preset = f"{args.preset}-quick" if f"{args.preset}-quick" in PRESETS else "quick"
    for key, value in {**PRESET_DEFAULTS, **PRESETS[args.preset]}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.reuse_seeds = args.reuse_seeds or args.seeds[:1]
    try:
        args.views_study = sorted({int(k) for k in args.views_study.split(",")}) if args.views_study else []
    except ValueError:
        p.error(f"--views-study {args.views_study}: give view counts such as 2,4,8")
    if any(k < 1 for k in args.views_study):
        p.error("--views-study: every view count must be at least 1")
    args.work = Path(args.work or f"runs/accuracy-{args.preset}")
    if args.out is None:
        if args.preset.endswith("-quick"):
            args.out = str(args.work / "result.json")
        else:
            # a views study runs apart from the four-mode comparison (see the sizes above), so it keeps its own file
            name = f"accuracy-{args.preset}{'-views' if args.views_study else ''}.json" if args.preset in ("converged", "finetune", "trees") else "accuracy.json"
            args.out = str(common.RESULTS / name)
    if args.fliplr is None:
        args.fliplr = 0.5 if args.data else 0.0
    if args.imgsz % 32:
        p.error("--imgsz must be a multiple of 32")
    if args.dataset == "trees" and not args.data:
        import trees

        try:
            trees.data_folder()  # before any training: the data may not be installed
        except trees.TreesUnavailable as e:
            p.error(str(e))
    if args.regime == "finetune":
        if args.pretrained and not Path(args.pretrained).is_file():
            p.error(f"--pretrained {args.pretrained}: checkpoint not found")
        if args.data and not (args.source_data or args.pretrained):
            p.error("the finetune regime with --data needs --source-data (a task to pretrain on) or --pretrained")
        if not args.pretrained and not args.pretrain_epochs:
            p.error("the finetune regime needs --pretrain-epochs or --pretrained")
        if args.teacher_pretrain_epochs and args.data and not args.source_data:
            p.error("--teacher-pretrain-epochs with --data needs --source-data (the task the teacher pretrains on)")
    elif args.pretrained or args.source_data or args.teacher_pretrain_epochs:
        p.error("--pretrained, --source-data and --teacher-pretrain-epochs belong to the finetune regime (--preset finetune)")
    return args


def prepare_data(args, root: Path | None = None, classes: tuple[int, ...] = (), data: str | None = None,
                 echo=print) -> tuple[Path, dict]:
    """The data.yaml and what identifies its training split (for the teacher's and the cache's manifests):
    `data` if given, else the preset's dataset built in `root`: the tree tiles, or digits scenes of `classes`
    (all ten when empty)."""
    from softlabel.demo import digits_for
    from softlabel.digits import ensure_digits

    if data:
        from softlabel.data import build_index, load_data_yaml

        spec = load_data_yaml(data)
        return Path(data), {"yaml": str(spec.yaml_path), "images_hash": build_index(spec, "train", check_images=False).list_hash()}
    if args.dataset == "trees":
        return prepare_trees(args, root or args.work / "data", echo)
    settings = digits_for(args.imgsz, args.train_scenes, args.val_scenes, seed=0, classes=classes)
    data_yaml, reused = ensure_digits(root or args.work / "data", settings)
    echo(f"dataset: {'reused' if reused else 'built'} {data_yaml}")
    return data_yaml, settings.to_dict()


def prepare_trees(args, root: Path, echo=print) -> tuple[Path, dict]:
    """The tree tiles (benchmarks/trees.py), --train-scenes / --val-scenes tiles at most per split (0: all)."""
    import trees

    caps = dict(max_train=args.train_scenes, max_val=args.val_scenes)
    data_yaml, manifest, reused = trees.ensure_trees(root, **caps)
    echo(f"dataset: {'reused' if reused else 'built'} {data_yaml}\n{trees.describe(manifest)}")
    # the tiles built, not the cap, for the JSON's settings and the plot's title
    args.train_scenes, args.val_scenes = (manifest["splits"][split]["tiles"] for split in ("train", "val"))
    return data_yaml, trees.settings(**caps)


def run_curves(run: Path) -> dict:
    """Per-epoch validation mAP50-95, summed distillation loss (train) and seconds, from the run's results.csv."""
    from softlabel.demo import read_results_csv

    cols = read_results_csv(run)
    n = len(cols.get(MAP, []))
    kd = [sum(cols[t][i] for t in KD_TERMS if t in cols) for i in range(n)] if any(t in cols for t in KD_TERMS) else None
    times = cols.get("time", [])
    return {"curve": cols.get(MAP, []), "kd": kd, "epoch_seconds": [b - a for a, b in zip([0.0, *times], times)]}


def run_mode(mode: str, student: str, seed: int, args, ctx: dict, store: Path | None = None, label: str | None = None) -> dict:
    """One training of `student` (a model name, or in the finetune regime the name whose pretrained checkpoint
    every mode starts from); `store` replaces the default cache for offline runs, `label` names the run."""
    from softlabel.demo import train_student, validate, weights_of
    from softlabel.train import make_trainer

    extra: dict = {}
    if mode == "offline":
        extra["trainer"] = make_trainer(cache=str((store or ctx["store"]).resolve()), distill_config=args.distill)
    elif mode == "online":  # the same replay (augmentation config, seed, views) the cache was dumped with
        extra["trainer"] = make_trainer(teacher_path=str(ctx["teacher"]), distill_config=args.distill, views=args.views,
                                        close_views=ctx["close_views"], replay_seed=0, augment_config=str(ctx["augment"]))
    elif mode == "ultralytics":
        extra["distill_model"] = str(ctx["teacher"])
    name = Path(student).stem
    start = str(ctx["init"][student]) if student in ctx.get("init", {}) else student
    label = label or mode
    project = args.work / "runs" / name
    run, seconds = train_student(start, ctx["recipe"], ctx["data"], args.epochs, seed, project, f"{label}-s{seed}", **extra)
    map50, map50_95 = validate(weights_of(run), ctx["data"], ctx["recipe"], args.work / "val", f"{name}-{label}-s{seed}")
    return {"map50_95": map50_95, "map50": map50, "seconds": seconds, "run": str(run), **run_curves(run)}


def tail_mean(curve: list[float]) -> float | None:
    """Mean val mAP50-95 over a run's last TAIL epochs: where val swings from one epoch to the next (few optimizer
    steps, so Ultralytics' EMA, warming up over 2,000 updates, barely averages), the best epoch is partly luck."""
    return statistics.fmean(curve[-TAIL:]) if curve else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and sample standard deviation over seeds (0 for a single seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    out: dict = {"seeds": seeds}
    for key in ("map50_95", "map50", "seconds"):
        values = [r[key] for r in runs]
        out[key] = values
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std(values)
    return {**out, **summarise_tail([r.get("curve") or [] for r in runs])}


def summarise_tail(curves: list[list[float]]) -> dict:
    """tail_mean of each seed's curve, and their mean and sample spread (None where a run has no curve)."""
    tails = [tail_mean(c) for c in curves]
    if not tails or None in tails:
        return {"map50_95_tail": None, "map50_95_tail_mean": None, "map50_95_tail_std": None}
    mean, std = mean_std(tails)
    return {"map50_95_tail": tails, "map50_95_tail_mean": mean, "map50_95_tail_std": std}


def mean_curve(curves: list[list[float]]) -> list[float]:
    """The per-epoch mean over seeds, as long as the shortest curve."""
    n = min((len(c) for c in curves), default=0)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def flatness(curve: list[float]) -> dict:
    """Gain of a val curve over its last 20% of epochs (at least one), and whether it is below 0.01."""
    if len(curve) < 2:
        return {"last_epochs": 0, "gain": None, "flattened": False}
    last = max(1, round(FLAT_SHARE * len(curve)))
    gain = curve[-1] - curve[-1 - last]
    return {"last_epochs": last, "gain": gain, "flattened": gain < FLAT_GAIN}


def fit_signal(val: list[float], kd: list[float] | None, mosaic_epochs: int, views: int) -> dict:
    """Where a student starts fitting the cached outputs rather than learning from them (see the module text)."""
    n = min(len(val), len(kd or []), mosaic_epochs)
    out = {"fit_epoch": None, "fit_replays": None, "mosaic_epochs": n}
    if n < 3:
        return out
    smooth = [statistics.fmean(val[max(0, i - 2): i + 1]) for i in range(n)]
    for e in range(n - 1):
        val_gain = max(smooth[e:]) - smooth[e]
        kd_drop = 1.0 - kd[n - 1] / kd[e] if kd[e] > 0 else 0.0
        if val_gain < FLAT_GAIN and kd_drop > 0.1:
            out.update(fit_epoch=e + 1, fit_replays=(e + 1) / views, val_gain_after=val_gain, kd_drop_after=kd_drop)
            break
    return out


def curves_of(runs: list[dict], seeds: list[int]) -> dict[str, list[float]]:
    return {str(seed): r["curve"] for seed, r in zip(seeds, runs)}


def ensure_store(args, ctx: dict, views: int, storage: dict) -> Path:
    """The cache of the target teacher with `views` mosaic views and these storage options, dumped once and reused."""
    from softlabel.demo import ensure_cache

    name = "cache" + "".join(f"-{k}{v}" for k, v in storage.items()) + ("" if views == args.views else f"-views{views}")
    store = args.work / f"{name}.zarr"  # one store per choice, so comparing them keeps every cache
    seconds, _ = ensure_cache(store, ctx["teacher"], ctx["data"], ctx["data_id"], ctx["recipe"], views, ctx["close_views"], 0, **storage)
    ctx.setdefault("dump_seconds", {})[store.name] = seconds
    return store


def main() -> None:
    args = parse_args()
    from softlabel.demo import Recipe, checkpoint_arch, ensure_teacher, validate

    start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(imgsz=args.imgsz, batch=args.batch, device=args.device, close_mosaic=args.close_mosaic, lr0=args.lr0,
                    fliplr=args.fliplr, nbs=args.nbs)
    finetune = args.regime == "finetune"
    data_yaml, data_id = prepare_data(args, classes=TARGET_CLASSES if finetune else (), data=args.data)

    init: dict[str, Path] = {}
    pretrain: dict | None = None
    # the source task, prepared once for whichever of student and teacher pretrain on it
    teacher_pretrains = finetune and bool(args.teacher_pretrain_epochs) and not args.teacher
    if finetune and (not args.pretrained or teacher_pretrains):
        source_yaml, source_id = prepare_data(args, args.work / "source-data", SOURCE_CLASSES, args.source_data)
    if finetune:
        if args.pretrained:
            init[args.student], seconds = Path(args.pretrained), None
        else:
            init[args.student], seconds = ensure_teacher(args.work / f"pretrain-{Path(args.student).stem}", args.student,
                                                         args.pretrain_epochs, recipe, 0, source_yaml, source_id, role="pretraining")
        p_map50, p_map50_95 = validate(init[args.student], data_yaml, recipe, args.work / "val", "pretrained")
        pretrain = {"weights": str(init[args.student]), "epochs": None if args.pretrained else args.pretrain_epochs,
                    "train_seconds": seconds, "source": args.source_data or (None if args.pretrained else f"digits {list(SOURCE_CLASSES)}"),
                    "target": args.data or f"digits {list(TARGET_CLASSES)}", "target_map50_95_before": p_map50_95, "target_map50_before": p_map50}
        print(f"pretrained {init[args.student]}: on the target before fine-tuning mAP50-95 {p_map50_95:.4f}", flush=True)

    teacher_pretrain: dict | None = None
    if args.teacher:
        teacher, teacher_seconds = Path(args.teacher), None
    else:
        teacher_recipe = dataclasses.replace(recipe, nbs=args.teacher_nbs) if args.teacher_nbs else recipe
        teacher_start = args.teacher_model
        if teacher_pretrains:
            t_init, seconds = ensure_teacher(args.work / f"pretrain-teacher-{Path(args.teacher_model).stem}", args.teacher_model,
                                             args.teacher_pretrain_epochs, teacher_recipe, 0, source_yaml, source_id,
                                             role="teacher pretraining")
            teacher_start = str(t_init)  # ensure_teacher's manifest holds its hash: a new pretraining retrains the teacher
            teacher_pretrain = {"weights": str(t_init), "epochs": args.teacher_pretrain_epochs, "train_seconds": seconds,
                                "source": args.source_data or f"digits {list(SOURCE_CLASSES)}"}
        teacher, teacher_seconds = ensure_teacher(args.work / "teacher", teacher_start, args.teacher_epochs, teacher_recipe, 0,
                                                  data_yaml, data_id)
    t_map50, t_map50_95 = validate(teacher, data_yaml, recipe, args.work / "val", "teacher")
    print(f"teacher {Path(teacher)}: mAP50-95 {t_map50_95:.4f}, mAP50 {t_map50:.4f}", flush=True)

    close_views = 1 if min(args.close_mosaic, args.epochs - 1) > 0 else 0
    storage = {k: v for k, v in (("precision", args.precision), ("head_topk", args.head_topk), ("head_floor", args.head_floor),
                                            ("feature_layout", args.features), ("feature_rows", args.feature_rows), ("branch", args.teacher_branch)) if v is not None}
    ctx = {"data": data_yaml, "data_id": data_id, "teacher": teacher, "recipe": recipe, "close_views": close_views, "init": init}
    ctx["store"] = store = ensure_store(args, ctx, args.views, storage)
    ctx["augment"] = store.parent / f"{store.stem}.augment.yaml"
    dense = ensure_store(args, ctx, args.views, DENSE_STORAGE) if args.storage_ablation else None
    views_stores = {k: store if k == args.views else ensure_store(args, ctx, k, storage) for k in args.views_study}

    # every training of a seed: (key, mode, store, label); seed-major, so a slow spell on a shared machine hits every mode alike
    jobs = [(m, m, None, None) for m in args.modes]
    if dense is not None:
        jobs.append(("offline-dense", "offline", dense, "offline-dense"))
    jobs += [(f"views{k}", "offline", st, f"offline-views{k}") for k, st in views_stores.items()
             if not (st == store and "offline" in args.modes)]
    runs: dict[str, list[dict]] = {key: [] for key, *_ in jobs}
    for seed in args.seeds:
        for key, mode, st, label in jobs:
            res = run_mode(mode, args.student, seed, args, ctx, st, label)
            runs[key].append(res)
            print(f"seed {seed} {key:<14} mAP50-95 {res['map50_95']:.4f}  mAP50 {res['map50']:.4f}  ({res['seconds']:.0f} s)", flush=True)

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

    mode_keys = [k for k in runs if not k.startswith("views")]
    modes = {m: summarise(runs[m], args.seeds) for m in mode_keys}
    for m in mode_keys:
        modes[m]["runs"] = [r["run"] for r in runs[m]]
        modes[m]["epoch_seconds_mean"] = statistics.fmean(x for r in runs[m] for x in r["epoch_seconds"]) if any(r["epoch_seconds"] for r in runs[m]) else None
    curves = {m: curves_of(runs[m], args.seeds) for m in mode_keys}
    plain_flat = flatness(mean_curve(list(curves["plain"].values()))) if "plain" in curves else None

    views_study: dict[str, dict] = {}
    mosaic_epochs = args.epochs - min(args.close_mosaic, args.epochs - 1)
    for k in args.views_study:
        rs = runs["offline"] if f"views{k}" not in runs else runs[f"views{k}"]
        entry = summarise(rs, args.seeds)
        entry["runs"] = [r["run"] for r in rs]
        entry["curves"] = curves_of(rs, args.seeds)
        entry["kd"] = {str(seed): r["kd"] for seed, r in zip(args.seeds, rs)}
        kd_runs = [r["kd"] for r in rs if r["kd"]]
        entry.update(fit_signal(mean_curve(list(entry["curves"].values())), mean_curve(kd_runs) if kd_runs else None, mosaic_epochs, k))
        entry["replays_per_view"] = mosaic_epochs / k
        views_study[str(k)] = entry

    result = {
        **common.header(args.device),
        "preset": args.preset,
        "regime": args.regime,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "recipe": asdict(recipe),
        "dataset": str(data_yaml),
        "epochs": args.epochs,
        "pretrain": pretrain,
        "teacher": {"model": checkpoint_arch(teacher) if args.teacher else args.teacher_model, "weights": str(teacher),
                    "epochs": None if args.teacher else args.teacher_epochs, "train_seconds": teacher_seconds,
                    "nbs": None if args.teacher else (args.teacher_nbs or args.nbs), "pretrain": teacher_pretrain,
                    "map50_95": t_map50_95, "map50": t_map50},
        "storage": storage or "default",
        "dense_storage": DENSE_STORAGE if dense is not None else None,
        "dump_seconds": ctx["dump_seconds"],
        "modes": modes,
        "curves": curves,
        "plain_flattened": plain_flat["flattened"] if plain_flat else None,
        "plain_flatness": plain_flat,
        "views_study": views_study or None,
        "reuse": reuse,
        "wall_seconds": round(time.time() - start, 1),
    }
    out = common.write_json(args.out, result)
    result["plot"] = str(plot(result, args, out.with_suffix(".png")))
    common.write_json(out, result)
    print()
    print(render(result, args, out))


def plot(result: dict, args, path: Path) -> Path:
    """Val mAP50-95 per epoch: each mode's seed mean (thin lines: single seeds), and the views study beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display, default DejaVu fonts
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = 2 if result["views_study"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, curves: dict[str, dict[str, list[float]]], title: str) -> None:
        for i, (label, per_seed) in enumerate(curves.items()):
            colour = colours[i % len(colours)]
            for c in per_seed.values():
                ax.plot(range(1, len(c) + 1), c, color=colour, alpha=0.25, lw=0.8)
            m = mean_curve(list(per_seed.values()))
            ax.plot(range(1, len(m) + 1), m, color=colour, lw=2, label=label)
        ax.axhline(result["teacher"]["map50_95"], color="grey", ls="--", label=f"teacher {result['teacher']['model']}")
        ax.set(xlabel="epoch", ylabel="val mAP50-95", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    flat = result["plain_flatness"]
    note = f"; plain flattened: {'yes' if flat['flattened'] else 'no'}" if flat and flat["gain"] is not None else ""
    draw(axes[0][0], result["curves"], f"{result['regime']}: {Path(args.student).stem}, {len(args.seeds)} seeds{note}")
    if result["views_study"]:
        draw(axes[0][1], {f"offline, K = {k}": e["curves"] for k, e in result["views_study"].items()}, "offline by mosaic views K")
    fig.suptitle(f"{args.preset} preset: imgsz {args.imgsz}, {args.train_scenes} train scenes, {args.epochs} epochs, "
                 f"batch {args.batch}, nbs {result['recipe']['nbs'] or args.batch}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cell(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def tail_cell(s: dict) -> str:
    """A summary's mean over the last TAIL epochs, or '-' where its runs had no curve."""
    return cell(s["map50_95_tail_mean"], s["map50_95_tail_std"]) if s.get("map50_95_tail_mean") is not None else "-"


def render(result: dict, args, out: Path) -> str:
    t = result["teacher"]
    rows = [[f"teacher {t['model']}" + (", pretrained on the source" if t.get("pretrain") else ""), "-", f"{t['map50_95']:.4f}", f"{t['map50']:.4f}", "-", "-"]]
    if result["pretrain"]:
        rows.append([f"{Path(args.student).stem} pretrained, before fine-tuning", "-", f"{result['pretrain']['target_map50_95_before']:.4f}",
                     f"{result['pretrain']['target_map50_before']:.4f}", "-", "-"])
    plain = result["modes"].get("plain")
    for m, s in result["modes"].items():
        gain = s["map50_95_mean"] - plain["map50_95_mean"] if plain else None
        rows.append([f"{Path(args.student).stem} {m}", len(s["seeds"]), cell(s["map50_95_mean"], s["map50_95_std"]),
                     cell(s["map50_mean"], s["map50_std"]), "-" if gain is None or m == "plain" else f"{gain:+.4f}", tail_cell(s)])
    for k, s in (result["views_study"] or {}).items():
        gain = s["map50_95_mean"] - plain["map50_95_mean"] if plain else None
        rows.append([f"{Path(args.student).stem} offline, {k} views", len(s["seeds"]), cell(s["map50_95_mean"], s["map50_95_std"]),
                     cell(s["map50_mean"], s["map50_std"]), "-" if gain is None else f"{gain:+.4f}", tail_cell(s)])
    for name, e in result["reuse"].items():
        for m in ("plain", "offline"):
            s = e[m]
            gain = e["gain_map50_95"] if m == "offline" else None
            rows.append([f"{name} {m} (reuse)", len(s["seeds"]), cell(s["map50_95_mean"], s["map50_95_std"]),
                         cell(s["map50_mean"], s["map50_std"]), "-" if gain is None else f"{gain:+.4f}", tail_cell(s)])
    title = (f"{args.preset} preset ({result['regime']}): {Path(args.student).stem} student, {t['model']} teacher, imgsz {args.imgsz}, "
             f"{args.epochs} epochs, batch {args.batch}, nbs {result['recipe']['nbs'] or args.batch}, device {args.device}; mean ± std over seeds")
    footer = []
    flat = result["plain_flatness"]
    if flat and flat["gain"] is not None:
        footer.append(f"plain flattened: {'yes' if flat['flattened'] else 'NO'} (seed-mean val mAP50-95 gained {flat['gain']:+.4f} "
                      f"over the last {flat['last_epochs']} epochs; flat means < {FLAT_GAIN})")
    for k, s in (result["views_study"] or {}).items():
        where = (f"fits the cache from epoch {s['fit_epoch']} ({s['fit_replays']:.1f} replays per view)" if s["fit_epoch"]
                 else "no sign of fitting the cache")
        footer.append(f"{k} views: {where} over {s['mosaic_epochs']} mosaic epochs")
    footer.append(f"val split of {result['dataset']}; wall time {result['wall_seconds'] / 60:.1f} min; written to {out}")
    if args.preset.endswith("quick"):
        footer.insert(0, "QUICK RUN: a smoke test; these numbers mean nothing.")
    return common.table(["model / mode", "seeds", "mAP50-95", "mAP50", "Δ vs plain", f"mAP50-95, last {TAIL} epochs"], rows, title, footer)


if __name__ == "__main__":
    main()
