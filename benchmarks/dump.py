"""Phase-one throughput and cache size.

Throughput: images per second of a whole dump (run_dump: replay in DataLoader workers, teacher,
float16 conversion, compression and writing) against the teacher's forward pass alone, at the
same batch size and precision, on the same number of pre-generated random uint8 batches sent
through to_model_input and Teacher.__call__. The dump's fixed setup (loading the teacher,
checking every image) is timed on its own with softlabel.dump.prepare and subtracted, so the
ratio compares steady-state rates; the end-to-end rate is reported as well.

Size: bytes on disk per sample-view of every cached tensor, for the dump's default store and for
each codec preset x precision with a dense head, and the compression ratio against the same
tensors in float32 (4 bytes x channels x H x W).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import common
import yaml

TARGET = 0.9  # dump images/s over forward images/s
DEFAULT = "default"  # the store `softlabel dump` writes without storage options
DEFAULT_DESCRIPTION = "int8, head sparse (top 64 anchors), blosc-zstd"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default sizes take about 5 minutes on 2 CPU cores. GPU run: --device 0 --imgsz 640 --batch 32 --images 1024 --workers 8",
    )
    p.add_argument("--images", type=int, default=128, help="training images in the generated toy dataset (default: 128)")
    p.add_argument("--nc", type=int, default=3, help="classes the data.yaml names (80: COCO's names, the operating point; default: 3)")
    p.add_argument("--data", default=None, help="an existing data.yaml to dump instead of the toy dataset (its whole train split)")
    p.add_argument("--imgsz", type=int, default=160, help="teacher input size, multiple of 32 (default: 160)")
    p.add_argument("--batch", type=int, default=16, help="teacher batch size, for the dump and the forward pass (default: 16)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 1, ... or cuda:N; float16 autocast on CUDA, as the dump does (default: cpu)")
    p.add_argument("--workers", type=int, default=1, help="dump DataLoader workers replaying augmentations (default: 1)")
    p.add_argument("--teacher-cfg", default=None, help="teacher model yaml built with random weights (default: yolov8x.yaml; yolov8n.yaml with --quick)")
    p.add_argument("--teacher", default=None, help="a real teacher checkpoint (.pt) instead of --teacher-cfg; random weights compress unrealistically")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for teacher and forward (default: torch's choice, one per core)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved forward/dump rounds; medians are reported (default: 3)")
    p.add_argument("--codecs", default=None, help="comma-separated codec presets to size (default: all of softlabel.cache.codecs.CODECS)")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard (default: 16)")
    p.add_argument("--default-only", action="store_true", help="time and size the default store only, not every codec x precision")
    p.add_argument("--seed", type=int, default=0, help="augmentation and data seed (default: 0)")
    common.add_kept_arg(p)
    p.add_argument("--out", default=str(common.RESULTS / "dump.json"), help="result JSON (default: benchmarks/results/dump.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, teacher, stores) and print its path")
    p.add_argument("--quick", action="store_true", help="smoke test: 16 images at imgsz 64, 1 repeat, yolov8n teacher (~1 minute)")
    args = p.parse_args()
    if args.quick:
        args.images, args.imgsz, args.batch, args.repeats = 16, 64, 8, 1
        args.teacher_cfg = args.teacher_cfg or "yolov8n.yaml"
    args.teacher_cfg = args.teacher_cfg or "yolov8x.yaml"
    return args


def prepare_inputs(args, tmp: Path) -> tuple[Path, Path]:
    """The data.yaml and teacher checkpoint to dump, generated where not given."""
    from softlabel.teacher import load_model

    if args.data:
        data = Path(args.data)
    else:
        data = common.make_data(tmp / "data", args.images, 1, args.imgsz, seed=args.seed, nc=args.nc)
    if not args.teacher:
        return data, common.make_kept_teacher(args.teacher_cfg, data, tmp / "teacher.pt", args.imgsz, args.kept, args.device)[0]
    teacher = Path(args.teacher)
    if not args.data:
        # a real teacher predicts its own classes: the toy labels (ids 0-2) stay valid under its names
        names = load_model(teacher)[1].names
        raw = yaml.safe_load(data.read_text())
        raw["names"] = dict(enumerate(names))
        data.write_text(yaml.safe_dump(raw, sort_keys=False))
    return data, teacher


def forward_seconds(teacher, batches: list, device) -> float:
    """The teacher alone: uint8 batch -> model input -> head and features, nothing kept."""
    from softlabel.teacher import to_model_input

    common.sync(device)
    with common.Timer() as t:
        for images in batches:
            teacher(to_model_input(images, device))
        common.sync(device)
    return t.seconds


def tensor_shapes(store: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of each cached tensor, keyed as summarize() keys them (head/p3, feat/p3, ...)."""
    from softlabel.cache.schema import Layout
    from softlabel.cache.store import read_attrs

    layout = Layout.from_attrs(read_attrs(store))
    return {path.partition("/")[2]: spec.shape for path, spec in layout.stored(layout.views[0]).items()}


def main() -> None:
    args = parse_args()
    import torch

    from softlabel.cache.codecs import CODECS, DEFAULT_CODEC
    from softlabel.cache.encoding import PRECISIONS
    from softlabel.cache.info import summarize
    from softlabel.data import build_index, load_data_yaml
    from softlabel.dump import DumpSettings, prepare, resolve_device, run_dump
    from softlabel.teacher import Teacher

    codecs = [c.strip() for c in args.codecs.split(",")] if args.codecs else list(CODECS)
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise SystemExit(f"--codecs: unknown {unknown}; choose from {list(CODECS)}")
    # the dump's defaults (int8, sparse head), then every codec x precision with a dense head
    options: dict[str, dict] = {DEFAULT: {} if args.teacher else common.kept_dump_options(args.kept, common.cfg_reg_max(args.teacher_cfg))}
    for codec in [] if args.default_only else codecs:
        for precision in PRECISIONS:
            options[f"{codec}/{precision}"] = dict(codec=codec, precision=precision, head_topk=0, feature_layout="dense")
    if args.threads:
        torch.set_num_threads(args.threads)  # fewer threads than cores is steadier on a machine shared with other work
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="softlabel-dumpbench-"))
    try:
        data, teacher_path = prepare_inputs(args, tmp)
        n = len(build_index(load_data_yaml(data), check_images=False))

        def store_of(name: str) -> str:
            return str(tmp / f"{name.replace('/', '-')}.zarr")

        def settings(name: str) -> DumpSettings:
            return DumpSettings(teacher=str(teacher_path), data=str(data), out=store_of(name),
                                views=1, close_views=0, imgsz=args.imgsz, batch=args.batch, device=args.device,
                                workers=args.workers, seed=args.seed, shard_size=args.shard_size, overwrite=True,
                                progress=False, **options[name])

        def timed_dump(name: str) -> tuple[float, float]:
            """(seconds of the whole dump, seconds of its fixed setup)."""
            with common.Timer() as setup:
                prepare(settings(name))
            with common.Timer() as whole:
                run_dump(settings(name))
            return whole.seconds, setup.seconds

        teacher = Teacher.load(teacher_path, device=device)
        # random pixels cost the network what real ones do; pinned like the dump's DataLoader pins them
        gen = torch.Generator().manual_seed(args.seed)
        sizes = [min(args.batch, n - s) for s in range(0, n, args.batch)]
        batches = [torch.randint(0, 256, (b, args.imgsz, args.imgsz, 3), dtype=torch.uint8, generator=gen) for b in sizes]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        forward_seconds(teacher, batches[:1], device)  # warm-up: kernel selection, allocator, first-call costs

        fwd, whole, setup = [], [], []
        for r in range(args.repeats):  # interleaved, so a slow spell on a shared machine hits both alike
            fwd.append(forward_seconds(teacher, batches, device))
            w, s = timed_dump(DEFAULT)
            whole.append(w)
            setup.append(s)
            print(f"repeat {r + 1}/{args.repeats}: forward {n / fwd[-1]:.1f} img/s, dump {n / (w - s):.1f} img/s "
                  f"({n / w:.1f} end to end, setup {s:.1f} s)", flush=True)
        del teacher

        per_option_ips = {DEFAULT: common.median([n / (w - s) for w, s in zip(whole, setup)])}
        per_tensor, totals, shapes = {}, {}, {}
        for name in options:
            if name != DEFAULT:
                w, s = timed_dump(name)
                per_option_ips[name] = n / (w - s)
            store = store_of(name)
            shapes[name] = tensor_shapes(store)
            sizes_on_disk = summarize(store)["bytes_per_sample_view"]
            per_tensor[name] = {k: sizes_on_disk[k] for k in shapes[name]}
            totals[name] = sum(sizes_on_disk.values())  # fingerprints, scales and done flags included
            print(f"{name:<22} {per_option_ips[name]:6.1f} img/s  {totals[name] / 1e3:9.1f} kB/sample-view", flush=True)
        threads = torch.get_num_threads()
        teacher_shapes = dense_shapes(store_of(DEFAULT))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    dense = f"{DEFAULT_CODEC}/float16"
    # every teacher tensor dense, in float32: what the cache would hold with no selection or compression
    raw = {k: 4 * _prod(s) for k, s in (shapes[dense] if dense in shapes else teacher_shapes).items()}
    raw_total = sum(raw.values())
    ratios = {name: {k: raw[k] / v for k, v in t.items() if k in raw and v} for name, t in per_tensor.items()}
    dump_ips = per_option_ips[DEFAULT]
    fwd_ips = common.median([n / f for f in fwd])
    ratio = dump_ips / fwd_ips
    teacher_name = args.teacher or f"{args.teacher_cfg} (random weights)"
    result = {
        **common.header(args.device),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "keep")}, "images": n,
                     "codec": DEFAULT_CODEC, "torch_threads": threads, "dump_defaults": DEFAULT_DESCRIPTION},
        "dump_images_per_sec": dump_ips,
        "dump_images_per_sec_end_to_end": common.median([n / w for w in whole]),
        "dump_setup_seconds": common.median(setup),
        "forward_images_per_sec": fwd_ips,
        "ratio_dump_over_forward": ratio,
        "target": {"op": ">=", "value": TARGET, "pass": ratio >= TARGET},
        "per_repeat": {"forward_seconds": fwd, "dump_seconds": whole, "setup_seconds": setup},
        "dump_images_per_sec_by_option": per_option_ips,
        "tensor_shapes": {name: {k: list(s) for k, s in sh.items()} for name, sh in shapes.items()},
        "float32_bytes_per_sample": raw,
        "bytes_per_sample_view": per_tensor,
        "bytes_per_sample_view_total": totals,
        "compression_ratio": ratios,
        "compression_ratio_total": {name: raw_total / t for name, t in totals.items()},
    }
    out = common.write_json(args.out, result)

    print()
    print(common.table(
        ["option", "dump img/s", "kB/sample-view", "x vs float32"],
        [[name, per_option_ips[name], totals[name] / 1e3, raw_total / totals[name]] for name in options],
        title=f"dump of {n} images at imgsz {args.imgsz}, batch {args.batch}, {args.workers} workers, teacher {teacher_name}, "
              f"device {args.device}; {DEFAULT}: {DEFAULT_DESCRIPTION}",
    ))
    if dense not in shapes:
        print(f"dump/forward = {ratio:.2f} ({common.verdict(ratio >= TARGET)}, target >= {TARGET}); written to {out}")
        return
    print()
    columns = [f"{DEFAULT_CODEC}/{p}" for p in PRECISIONS]
    rows = [[k, "x".join(map(str, shapes[dense][k])), raw[k] / 1e3,
             *(f"{per_tensor[c][k] / 1e3:.1f} ({ratios[c][k]:.1f}x)" for c in columns)] for k in shapes[dense]]
    rows += [[f"{DEFAULT}: {k}", "x".join(map(str, shapes[DEFAULT][k])), "-", f"{v / 1e3:.1f}", "", ""]
             for k, v in per_tensor[DEFAULT].items()]
    footer = [
        f"forward alone {fwd_ips:.1f} img/s; dump ({DEFAULT}) {dump_ips:.1f} img/s steady ({result['dump_images_per_sec_end_to_end']:.1f} "
        f"end to end, {result['dump_setup_seconds']:.1f} s setup), medians of {args.repeats}",
        f"{common.verdict(ratio >= TARGET)}  dump/forward = {ratio:.2f} (target >= {TARGET})",
    ]
    if not args.teacher:
        footer.append("note: a teacher with random weights compresses unrealistically; pass --teacher with a trained checkpoint for real sizes")
    if not args.data:
        footer.append("note: toy images (shapes on noise) are not natural images; pass --data for a real dataset")
    footer.append(f"written to {out}")
    print(common.table(["tensor", "shape", "f32 kB", *(f"{c} kB (ratio)" for c in columns)], rows,
                       title="bytes on disk per sample-view (dense head unless named default)", footer=footer))


def dense_shapes(store: str) -> dict[str, tuple[int, ...]]:
    """The teacher's dense per-sample tensors (head/p3, feat/p3, ...) behind a store, whatever it keeps of them."""
    from softlabel.cache.schema import Layout
    from softlabel.cache.store import read_attrs

    layout = Layout.from_attrs(read_attrs(store))
    out = {f"head/{lvl}": tuple(shape) for lvl, shape in layout.head.items()}
    out.update({f"feat/{lvl}": tuple(shape) for lvl, shape in layout.feat.items()})
    return out


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


if __name__ == "__main__":
    main()
