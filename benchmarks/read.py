"""Phase-two input: can reading the cache keep up with the student?

Delivery: cached samples per second out of the training input pipeline, built as
DistillTrainer.get_dataloader builds it (DistillDataset: replay + cache read + fingerprint check,
EpochSampler, InfiniteDataLoader, DistillDataset.collate_fn), with 0, 1 and 2 DataLoader workers.
The first batch of each loader (worker start-up) is not timed; by then up to 2 x workers batches may
already wait in the prefetch queue, a bias that is small once an epoch holds many batches.

Consumption: images per second one training step of the student takes in: forward, the
detection loss plus the distillation terms (DistillModel), backward and an SGD step, on a real
batch from the cache already on the device (AMP on CUDA, as Ultralytics trains).

Reference: samples per second of Ultralytics' own YOLODataset (its mosaic, affine, HSV and flips)
on the same images, 0 workers, as plain training reads them on CPU.

Both are measured in turn --repeats times, each from a fresh dataset, and each keeps its best.

On CPU both run with the thread count Ultralytics' trainer sets (torch.set_num_threads).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import common


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default sizes take about 3 minutes on 2 CPU cores. GPU run: --device 0 --imgsz 640 --batch 16 --workers 0,1,2,4,8",
    )
    p.add_argument("--images", type=int, default=128, help="training images in the generated toy dataset (default: 128)")
    p.add_argument("--nc", type=int, default=3, help="classes the data.yaml names (80: COCO's names, the operating point; default: 3)")
    p.add_argument("--imgsz", type=int, default=320, help="image size of cache and student, multiple of 32 (default: 320)")
    p.add_argument("--batch", type=int, default=8, help="batch size of the loader and of the student step (default: 8)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts to measure (default: 0,1,2)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the dataset per worker count (default: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed student steps, after 2 untimed warm-up steps (default: 5)")
    p.add_argument("--student", default="yolov8n.yaml", help="student model yaml (default: yolov8n.yaml)")
    p.add_argument("--teacher-cfg", default=None, help="teacher yaml for the cache, random weights, calibrated (--kept) (default: yolov8x.yaml; yolov8n.yaml with --quick)")
    p.add_argument("--teacher", default=None, help="a teacher checkpoint (.pt) for the dump instead of --teacher-cfg (its nc must match the data)")
    p.add_argument("--cache", default=None, help="read an existing cache store instead of dumping one (needs --data, the data it was dumped from)")
    p.add_argument("--data", default=None, help="data.yaml of --cache")
    p.add_argument("--dump-workers", type=int, default=1, help="DataLoader workers of the dump that writes the cache (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 1, ... for the dump's teacher and the student step (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for loader and student step (default on CPU: what Ultralytics' trainer sets, cores-1 up to 8)")
    p.add_argument("--seed", default=0, type=int, help="augmentation and sampling seed (default: 0)")
    common.add_kept_arg(p)
    p.add_argument("--out", default=str(common.RESULTS / "read.json"), help="result JSON (default: benchmarks/results/read.json)")
    p.add_argument("--repeats", type=int, default=3, help="measure ours and Ultralytics' in turn this many times, keep each one's best (default: 3)")
    p.add_argument("--note", default=None, help="a remark stored with the result (e.g. why this teacher)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, teacher, cache) and print its path")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 images at imgsz 64, 1 epoch, 2 steps, yolov8n teacher (~1 minute)")
    args = p.parse_args()
    if args.quick:
        args.images, args.imgsz, args.batch, args.epochs, args.steps, args.repeats = 16, 64, 4, 1, 2, 1
        args.teacher_cfg = args.teacher_cfg or "yolov8n.yaml"
    args.teacher_cfg = args.teacher_cfg or "yolov8x.yaml"
    args.workers = [int(w) for w in args.workers.split(",")]
    if bool(args.cache) != bool(args.data):
        p.error("--cache and --data go together")
    return args


def build_dataset(store: str, data: str):
    """The training dataset exactly as DistillTrainer builds it from a cache."""
    from softlabel.augment import AugmentConfig
    from softlabel.cache.reader import CacheReader
    from softlabel.data import build_index, load_data_yaml
    from softlabel.replay import Replay
    from softlabel.train import DistillDataset, ViewPlan

    reader = CacheReader(store)
    reader.require_complete()
    aug = reader.attrs["augment"]
    index = build_index(load_data_yaml(data), check_images=False)
    replay = Replay(index, AugmentConfig.from_attrs(aug), int(aug["imgsz"]), int(aug["seed"]))
    # no closing epochs: every epoch reads the mosaic views, cycled as a long run would
    plan = ViewPlan(epochs=10_000, close_mosaic=0, views=int(aug["views"]), close_views=int(aug["close_views"]))
    return DistillDataset(replay, plan, reader)


def make_loader(dataset, batch: int, workers: int, seed: int, cuda: bool):
    """The arguments of DistillTrainer.get_dataloader, for one rank."""
    from ultralytics.data.build import InfiniteDataLoader

    from softlabel.train import DistillDataset, EpochSampler

    workers = min(workers, batch)
    sampler = EpochSampler(len(dataset), seed, groups=dataset.epoch_groups, batch=batch, workers=workers)
    return InfiniteDataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers,
        collate_fn=DistillDataset.collate_fn, pin_memory=cuda, drop_last=False,
    )


def loader_rate(loader, epochs: int) -> tuple[float, dict]:
    """Samples per second a loader delivers after its first batch; also returns that first batch."""
    first, samples, start = None, 0, 0.0
    try:
        for _ in range(epochs):
            for batch in loader:
                if first is None:  # workers are up and the pipeline is primed from here on
                    first, start = batch, time.perf_counter()
                else:
                    samples += batch["img"].shape[0]
        seconds = time.perf_counter() - start
    finally:
        loader.close()  # persistent workers would otherwise outlive the measurement
    if samples == 0:
        raise SystemExit("too few batches to time: raise --images or --epochs, or lower --batch")
    return samples / seconds, first


def delivery_rate(dataset, args, workers: int, cuda: bool) -> tuple[float, dict]:
    """The training dataset's samples per second; also returns its first batch for the student step."""
    return loader_rate(make_loader(dataset, args.batch, workers, args.seed, cuda), args.epochs)


def plain_rate(data: str, args) -> float:
    """Samples per second of Ultralytics' own training dataset (YOLODataset: load, mosaic, affine,
    HSV, flips) on the same images and image size, 0 workers: what plain training reads at."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": args.imgsz, "batch": args.batch, "close_mosaic": 0, "verbose": False})
    info = check_det_dataset(data)
    dataset = build_yolo_dataset(cfg, info["train"], args.batch, info, mode="train", stride=32)
    loader = build_dataloader(dataset, args.batch, workers=0, shuffle=True, pin_memory=False, device="cpu")
    return loader_rate(loader, args.epochs)[0]


def teacher_bytes_per_sample(batch: dict) -> float:
    """Bytes of teacher tensors one sample puts into a collated batch: what workers ship and the GPU receives."""
    import dataclasses

    import torch

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield from tensors(getattr(value, f.name))
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    teacher = [v for k, v in batch.items() if k == "teacher" or k.startswith("teacher_")]
    total = sum(t.numel() * t.element_size() for v in teacher for t in tensors(v))
    return total / batch["img"].shape[0]


def student_rate(batch: dict, args, attrs: dict, device) -> float:
    """Images per second one full training step of the student consumes."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from softlabel.distill.config import load_distill
    from softlabel.distill.distiller import Distiller
    from softlabel.distill.model import DistillModel
    from softlabel.heads import head_spec

    t = attrs["teacher"]
    model = DetectionModel(args.student, nc=t["nc"], verbose=False).to(device).train()
    model.args = get_cfg()  # the loss gains (box, cls, dfl) Ultralytics' trainer puts there
    s = head_spec(model)
    t_levels = list(attrs["storage"]["levels"])
    t_channels = [dict(zip(t["levels"], t["feature_channels"]))[lvl] for lvl in t_levels]
    distiller = Distiller(load_distill(None, s.reg_max, int(t["reg_max"])), s.reg_max, list(s.levels), list(s.channels),
                          t_levels, t_channels, teacher_reg_max=int(t["reg_max"]), student_strides=list(s.strides),
                          student_branches=s.branches, nc=s.nc)
    model = DistillModel(model, distiller.to(device)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.937, nesterov=True)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) or k == "teacher" else v for k, v in batch.items()}
    n = batch["img"].shape[0]

    def step():
        with torch.autocast(device.type, enabled=cuda):
            loss, _ = model({**batch, "img": batch["img"].float() / 255})
        scaler.scale(loss.sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernel selection
        step()
    common.sync(device)
    with common.Timer() as timer:
        for _ in range(args.steps):
            step()
        common.sync(device)
    return n * args.steps / timer.seconds


def main() -> None:
    args = parse_args()
    import torch
    from ultralytics.utils import NUM_THREADS

    from softlabel.cache.store import read_attrs
    from softlabel.dump import DumpSettings, resolve_device, run_dump

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="softlabel-readbench-"))
    try:
        calibration = None
        if args.cache:
            store, data = args.cache, args.data
        else:
            data = str(common.make_data(tmp / "data", args.images, 1, args.imgsz, seed=args.seed, nc=args.nc))
            if args.teacher:
                teacher = args.teacher
            else:
                teacher, calibration = common.make_kept_teacher(args.teacher_cfg, Path(data), tmp / "teacher.pt", args.imgsz, args.kept, args.device)
            store = str(tmp / "cache.zarr")
            print(f"dumping the cache ({args.images} images, imgsz {args.imgsz}) ...", flush=True)
            run_dump(DumpSettings(teacher=str(teacher), data=data, out=store, views=1, close_views=0, imgsz=args.imgsz,
                                  batch=args.batch, device=args.device, workers=args.dump_workers, seed=args.seed,
                                  progress=False, **({} if args.teacher else common.kept_dump_options(args.kept, common.cfg_reg_max(args.teacher_cfg)))))
        attrs = read_attrs(store)
        kept = common.kept_stats(store) if attrs["storage"].get("head_sparse") else None
        if args.threads:
            torch.set_num_threads(args.threads)
        elif device.type == "cpu":
            torch.set_num_threads(NUM_THREADS)  # what Ultralytics' trainer runs a CPU training with
        # ours and Ultralytics' in turn, each from a fresh dataset, the best of the repeats: on a shared
        # machine another process's load falls on one side of a single pair of runs
        repeats, plains, batch = {str(w): [] for w in args.workers}, [], None
        for _ in range(args.repeats):
            for w in args.workers:
                dataset = build_dataset(store, data)
                rate, first = delivery_rate(dataset, args, w, cuda)
                repeats[str(w)].append(rate)
                batch = batch or first
                print(f"{w} workers: {rate:.1f} samples/s", flush=True)
            plains.append(plain_rate(data, args))
            print(f"Ultralytics' YOLODataset, 0 workers: {plains[-1]:.1f} samples/s", flush=True)
        n = len(dataset)
        rates, plain = {w: max(r) for w, r in repeats.items()}, max(plains)
        teacher_bytes = teacher_bytes_per_sample(batch)
        print(f"teacher tensors in a collated batch: {teacher_bytes / 1e6:.3f} MB per sample", flush=True)
        consumes = student_rate(batch, args, attrs, device)
        print(f"student step: {consumes:.1f} images/s", flush=True)
        threads = torch.get_num_threads()
        # how many images each side holds decoded: a dataset larger than both is the honest case
        held = dataset.replay._cache
        replay_cache_images = int(dataset.replay.cache_bytes / (dataset.replay._cached_bytes / len(held))) if held else None
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    t = attrs["teacher"]
    result = {
        **common.header(args.device),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "keep", "note")}, "images": n,
                     "cache_teacher": t["arch"], "cache_levels": attrs["storage"]["levels"],
                     "codec": attrs["storage"]["codec"].get("preset"), "torch_threads": threads},
        "samples_per_sec": rates,  # the best of the repeats, as is plain_dataset_samples_per_sec
        "samples_per_sec_repeats": repeats,
        "plain_samples_per_sec_repeats": plains,
        "student_consumes_per_sec": consumes,
        "plain_dataset_samples_per_sec": plain,  # Ultralytics' YOLODataset, same images, 0 workers
        "delivery_over_consumption": {w: r / consumes for w, r in rates.items()},
        "imgsz": int(attrs["augment"]["imgsz"]),
        "nc": int(t["nc"]),
        # per-sample cost of the training dataset (replay + cache read + fingerprint) against Ultralytics' own
        "ms_per_sample": {w: 1000.0 / r for w, r in rates.items()},
        "plain_ms_per_sample": 1000.0 / plain,
        "ratio_over_plain": {w: plain / r for w, r in rates.items()},
        "teacher_bytes_per_sample": teacher_bytes,
        "images_held_decoded": {"replay_cache": replay_cache_images, "ultralytics_buffer": min(n, args.batch * 8, 1000),
                                "dataset": n, "replay_mosaic_group": int(attrs["augment"].get("mosaic_group", 0))},
        "kept_anchors": kept,  # per image, in the store read
        "teacher_calibration": calibration,
        "note": args.note,
    }
    out = common.write_json(args.out, result)

    rows = [[w, r, r / consumes, "yes" if r >= consumes else "no"] for w, r in rates.items()]
    footer = [
        f"student {args.student} step (forward + DistillModel loss + backward + SGD, batch {args.batch}): {consumes:.1f} images/s",
        f"Ultralytics' own YOLODataset on the same images, 0 workers: {plain:.1f} samples/s (what plain training reads at)",
        f"per sample, 0 workers: {1000.0 / rates['0']:.1f} ms against {1000.0 / plain:.1f} ms for YOLODataset "
        f"({plain / rates['0']:.2f}x)" if "0" in rates else "0 workers not measured",
        f"teacher tensors in a collated batch: {teacher_bytes / 1e6:.3f} MB per sample",
        f"torch threads {threads}; {args.epochs} epoch(s) of {n} samples per worker count, first batch untimed",
        f"written to {out}",
    ]
    title = (f"cache read: teacher {t['arch']} features {','.join(attrs['storage']['levels']) or 'none'}, "
             f"imgsz {attrs['augment']['imgsz']}, batch {args.batch}, device {args.device}")
    print()
    print(common.table(["workers", "samples/s", "x student", "keeps up"], rows, title, footer))


if __name__ == "__main__":
    main()
