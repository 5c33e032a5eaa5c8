"""The `softlabel` command: parses options, calls the phases, prints. No logic of its own."""

from __future__ import annotations

import json
import sys

import click

from softlabel.dumpsettings import DEFAULT_FEATURE_ROWS, default, describe_defaults
from softlabel.errors import UserError
from softlabel.views import DEFAULT_VIEWS, FIT_REPLAYS


class _Group(click.Group):
    """Bad input ends in one line on stderr and exit code 2, never a traceback or a usage block."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            where = f"softlabel {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "softlabel"
            click.echo(f"{where}: error: {_one_line(str(e))}", err=True)
            sys.exit(2)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"softlabel {ctx.info_name}" if ctx is not None and ctx.parent is not None else "softlabel"
            click.echo(f"{where}: error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback:
    keep only the original message, its last line."""
    if "Traceback" not in message:
        return " ".join(message.split())
    last = [ln for ln in message.strip().splitlines() if ln.strip()][-1]
    return last.split("UserError: ", 1)[-1]


def _imgsz(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and (value < 32 or value % 32):
        raise click.BadParameter(f"{value} is not a positive multiple of 32", ctx, param)
    return value


def _train_batch(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value != -1 and value < 1:
        raise click.BadParameter(f"{value}: give 1 or more, or -1 for Ultralytics' choice from GPU memory", ctx, param)
    return value


def _levels(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip().lower() for v in value.split(",") if v.strip()]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="softlabel")
def main() -> None:
    """Cached knowledge distillation for YOLO detectors: dump a teacher once, train many students."""


@main.command()
@click.option("--teacher", required=True, help="Ultralytics detection checkpoint (.pt) of the teacher, e.g. yolov8x.pt.")
@click.option("--data", required=True, help="Ultralytics data.yaml; its 'train' split is replayed and cached.")
@click.option("--out", required=True, help="Cache store to write: a folder (cache.zarr) or an fsspec URL (s3://..., memory://...).")
@click.option("--views", default=default("views"), show_default=True, type=click.IntRange(min=1), help="Mosaic views per image; student epoch e replays view e mod VIEWS. "
              f"Past about {FIT_REPLAYS} replays of each view a student fits the cached outputs instead of learning from them: give at least "
              f"(epochs - close_mosaic) / {FIT_REPLAYS} ({DEFAULT_VIEWS} suits Ultralytics' 100 epochs). Each view adds a teacher pass and its bytes.")
@click.option("--close-views", default=default("close_views"), show_default=True, type=click.IntRange(min=0), help="Closing (no-mosaic) views for the student's last close_mosaic epochs.")
@click.option("--imgsz", default=default("imgsz"), show_default=True, callback=_imgsz, help="Square input size of teacher and students (multiple of 32).")
@click.option("--batch", default=default("batch"), show_default=True, type=click.IntRange(min=1), help="Teacher batch size.")
@click.option("--device", default=default("device"), show_default=True, help="Teacher device: cpu, 0, 1, ... or cuda:N (AMP on CUDA).")
@click.option("--workers", default=default("workers"), show_default=True, type=click.IntRange(min=0), help="DataLoader worker processes replaying augmentations.")
@click.option("--seed", default=default("seed"), show_default=True, help="Augmentation seed; students replay the same seed.")
@click.option("--augment", "augment", default=None, help="Augmentation config: a built-in name (default) or a YAML path [default: default, Ultralytics' defaults].")
@click.option("--levels", default=None, help="Feature levels to keep, comma-separated (e.g. p4,p5) [default: all].")
@click.option("--no-features", is_flag=True, help="Store head outputs only, no neck features.")
@click.option("--features", "feature_layout", default=default("feature_layout"), show_default=True, type=click.Choice(["sparse", "dense"]),
              help="sparse: feature vectors at the sparse head's first --feature-rows kept anchors only (what the default feature term reads); "
                   "dense: whole feature maps, for configs with cwd, mgd or 'positions: all'.")
@click.option("--codec", default=default("codec"), show_default=True, help="Compression preset for all tensors (blosc-zstd, blosc-lz4, zstd, none), or per tensor: head=zstd,feat=blosc-lz4.")
@click.option("--precision", default=None, type=click.Choice(["float16", "bfloat16", "int8", "float32"]),
              help="Stored precision; int8 keeps one scale per sample and channel "
                   f"[default: {describe_defaults('precision')}].")
@click.option("--box-precision", default=None, type=click.Choice(["float32", "float16", "bfloat16", "int8", "same"]),
              help="Sparse head: keep the box outputs in an array of their own at this precision, or 'same': beside the "
                   f"class logits at --precision [default: {describe_defaults('box_precision')}].")
@click.option("--head-topk", default=None, type=int,
              help="Sparse head: keep box outputs and class logits only for at most K anchors with the highest teacher score per image; "
                   f"the rest read back as background. 0 keeps every anchor (a dense head) [default: {describe_defaults('topk')}].")
@click.option("--head-floor", default=None, type=float,
              help="Sparse head: of those K, keep only anchors whose best class score (sigmoid) is at least this "
                   f"[default with a sparse head: {describe_defaults('floor')}].")
@click.option("--feature-rows", default=None, type=int,
              help="Sparse features: store feature vectors for the F most confident kept anchors only (1 <= F <= K); "
                   f"a config's 'positions' must not exceed F [default: {DEFAULT_FEATURE_ROWS}, or K if smaller].")
@click.option("--shard-size", default=default("shard_size"), show_default=True, type=click.IntRange(min=1), help="Samples per shard (the unit of writing and of resume).")
@click.option("--overwrite", is_flag=True,
              help="Delete the softlabel cache at --out and start over. Only a softlabel cache is ever deleted: "
                   "a folder or file holding anything else is refused and left untouched.")
@click.option("--strict", is_flag=True, help="Refuse images and labels Ultralytics would skip (corrupt, class id >= nc, ...) instead of skipping them.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--teacher-branch", "branch", default=None, type=click.Choice(["one2many", "one2one", "mean"]),
              help="End-to-end teachers (YOLO26, YOLOv10): the branch whose outputs are cached, or mean (one2many's boxes, the mean "
                   "of both branches' class logits) [default: one2many, the dense branch]; ignored for other heads.")
@click.option("--half/--no-half", default=default("half"), show_default=True,
              help="Run the teacher in float16 (autocast, CUDA only; the store records the precision used).")
def dump(teacher, data, out, views, close_views, imgsz, batch, device, workers, seed, augment, levels, no_features, feature_layout, codec, precision, box_precision, head_topk, head_floor, feature_rows, shard_size, overwrite, strict, quiet, branch, half):
    """Run the teacher once over replayed augmentations and cache its outputs.

    Running the same command again resumes at the first unfinished shard; a store written with
    other settings is refused with the list of what differs.
    """
    from softlabel.cache.info import human_bytes
    from softlabel.dump import DumpSettings, run_dump

    settings = DumpSettings(
        teacher=teacher, data=data, out=out, views=views, close_views=close_views, imgsz=imgsz, batch=batch,
        device=device, workers=workers, seed=seed, augment=augment, levels=_levels(levels), features=not no_features, feature_layout=feature_layout,
        overwrite=overwrite, codec=codec, precision=precision, box_precision=box_precision, head_topk=head_topk, head_floor=head_floor, feature_rows=feature_rows,
        shard_size=shard_size, progress=not quiet, strict=strict, half=half, branch=branch,
    )
    result = run_dump(settings)
    click.echo(
        f"{result.out}: {result.samples_done} sample-views written in {result.shards_written} shards, "
        f"{human_bytes(result.disk_bytes)} of shards on disk ({result.skipped_shards} shards were already done); "
        f"views {', '.join(result.views)}"
    )


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable self-description as JSON.")
def info(store, as_json):
    """Describe a cache: teacher, data, augmentation, views done, bytes on disk per tensor."""
    from softlabel.cache.info import render, summarize

    summary = summarize(store)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@main.command()
@click.argument("store")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(min=0), help="Replayed samples to re-run the teacher on, spread over all views.")
@click.option("--teacher", default=None, help="Teacher checkpoint [default: the path recorded in the store]; must have the recorded sha256.")
@click.option("--data", default=None, help="data.yaml [default: the path recorded in the store].")
@click.option("--device", default="cpu", show_default=True, help="Device for the teacher: cpu, 0, cuda:N.")
@click.option("--atol", default=None, type=float, help="Absolute tolerance per value [default: by the store's precision].")
@click.option("--rtol", default=None, type=float, help="Relative tolerance per value [default: by the store's precision].")
@click.option("--no-scan", is_flag=True, help="Skip reading every chunk for checksum errors.")
@click.option("--half/--no-half", default=None,
              help="Run the teacher in float16 (CUDA only) or float32 [default: as the dump did]; a float16 side widens the default tolerance.")
def verify(store, samples, teacher, data, device, atol, rtol, no_scan, half):
    """Check a cache: every chunk's checksum, then cache == live teacher on replayed samples.

    Exits 0 when all is well, 1 on any corrupt chunk, fingerprint mismatch or error beyond tolerance.
    """
    from softlabel.verify import render, run_verify

    report = run_verify(store, samples=samples, teacher=teacher, data=data, device=device, atol=atol, rtol=rtol, scan=not no_scan, half=half)
    click.echo(render(report))
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--student", "students", multiple=True,
              help="Student as Ultralytics names it: yolov8n (the pretrained yolov8n.pt, found locally or fetched; yolov8n.yaml "
                   "from scratch where it cannot be had), yolov8n.yaml (random weights) or a .pt checkpoint. Repeat to train several "
                   "in turn, or at once with --cohort.")
@click.option("--cohort", is_flag=True,
              help="Train every student at once on one stream of batches: each batch is replayed and read from the cache (or run "
                   "through the live teacher) once for all. Each student keeps its own optimizer, EMA, validation, checkpoints and "
                   "run folder (one folder per student under the cohort's, --project/--name, default runs/detect/cohort) and ends "
                   "with the weights it would have trained alone. Resume an interrupted cohort with resume=COHORT_FOLDER.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="With --cohort: one student per value (and per combination, when repeated) of an Ultralytics training "
                   "argument (lr0=0.01,0.005) or of distill=CONFIG,CONFIG. Arguments that shape the batches (batch, imgsz, "
                   "epochs, seed, data, ...) are one value for the whole cohort.")
@click.option("--cache", default=None, help="Cache store written by 'softlabel dump' (offline distillation).")
@click.option("--teacher", default=None, help="Teacher checkpoint run live on the same replayed inputs (online mode), instead of --cache.")
@click.option("--data", default=None, help="Ultralytics data.yaml: the same data the cache was dumped from [default: the one the cache records].")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(min=1), help="Training epochs (Ultralytics' meaning).")
@click.option("--distill", "distill", default=None, help="Distillation config: a built-in name (default, distances, accurate, logits_only) "
              "or a YAML path [default: default where teacher and student have the same DFL bins; distances (a box term on decoded "
              "distances) where either predicts distances, e.g. YOLO26].")
@click.option("--imgsz", default=None, type=int, callback=_imgsz, help="Image size; must equal the cache's [default: the cache's, or 640 online].")
@click.option("--batch", default=16, show_default=True, callback=_train_batch, help="Batch size (Ultralytics' meaning: -1 picks one from GPU memory).")
@click.option("--device", default=None, help="cpu, 0, 0,1 (DDP), ... (Ultralytics' meaning) [default: Ultralytics' choice].")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=0), help="DataLoader workers replaying and reading the cache (forced to 0 on CPU by Ultralytics).")
@click.option("--seed", default=0, show_default=True, help="Training seed (initialisation, shuffling); the replay seed comes from the cache.")
@click.option("--close-mosaic", default=10, show_default=True, type=click.IntRange(min=0), help="Last N epochs replay closing (no-mosaic) views.")
@click.option("--project", default=None, help="Ultralytics project folder for runs.")
@click.option("--name", default=None, help="Run name (one per student, suffixed with the student when several).")
@click.option("--plots/--no-plots", default=False, show_default=True, help="Ultralytics' training plots (fetch a font on first use).")
@click.option("--views", default=DEFAULT_VIEWS, show_default=True, type=click.IntRange(min=1), help="Online mode: mosaic views to cycle through, as a dump would.")
@click.option("--close-views", default=1, show_default=True, type=click.IntRange(min=0), help="Online mode: closing views, as a dump would.")
@click.option("--augment", default=None, help="Online mode: augmentation config, a built-in name or a YAML path [default: default].")
@click.option("--replay-seed", default=0, show_default=True, help="Online mode: augmentation seed, as dump --seed.")
@click.option("--half/--no-half", default=None,
              help="Online mode: run the teacher in float16 (CUDA only) or float32 [default: as the student's AMP].")
def train(overrides, students, cohort, sweeps, cache, teacher, data, epochs, distill, imgsz, batch, device, workers, seed, close_mosaic, project, name, plots, views, close_views, augment, replay_seed, half):
    """Train one or more students against a cache (or a live teacher), then print a table.

    Any other Ultralytics training argument follows in its own KEY=VALUE form, e.g. lr0=0.005
    optimizer=AdamW cos_lr=True; Ultralytics' config check validates them.
    """
    from softlabel.cache.lock import ReadLock
    from softlabel.checks import check_train_numbers
    from softlabel.student import check_student
    from softlabel.distill.config import load_distill
    from softlabel.train import render_table, train_students
    from softlabel.trainargs import OPTION_KEYS, merge_options, parse_train_args

    ctx = click.get_current_context()
    explicit = {k for k in OPTION_KEYS if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE}
    options = dict(data=data, epochs=epochs, imgsz=imgsz, batch=batch, device=device, workers=workers, seed=seed,
                   close_mosaic=close_mosaic, project=project, name=name, plots=plots)
    given = parse_train_args(overrides)
    typed = explicit | (set(given) & set(OPTION_KEYS))  # what the user wrote, either way
    options, extra = merge_options(options, explicit, given)
    data, epochs, imgsz, batch, device, workers, seed, close_mosaic, project, name, plots = (options[k] for k in OPTION_KEYS)
    if sweeps and not cohort:
        raise UserError("--sweep trains its students at once: add --cohort")
    if cohort and extra.get("resume"):
        from softlabel.train.cohort import run_cohort

        if students or cache or teacher or sweeps:
            raise UserError("resume=COHORT_FOLDER takes the students and settings from the folder's cohort.json; give nothing else")
        rows = run_cohort([], [], {}, {}, resume=str(extra["resume"]), echo=click.echo)
        click.echo(render_table(rows))
        return
    if not students:
        raise UserError("give at least one --student")
    if bool(cache) == bool(teacher):
        raise UserError("give exactly one of --cache (offline) or --teacher (online)")
    check_train_numbers(epochs=epochs, batch=batch, workers=workers, imgsz=imgsz, close_mosaic=close_mosaic)
    load_distill(distill)  # a bad config stops here, before any model is built or any run folder made
    if cache:  # held until the command ends, error or not: no dump may write or remove the cache under us
        ctx.with_resource(ReadLock(cache))
    data, imgsz = _check_train_sources(cache, teacher, data, imgsz)
    for student in students:
        check_student(student)
    settings = dict(cache=cache, teacher_path=teacher, distill_config=distill, replay_seed=replay_seed,
                    augment_config=augment, views=views, close_views=close_views, teacher_half=half)
    args = dict(data=data, epochs=epochs, imgsz=imgsz, batch=batch, workers=workers, seed=seed, close_mosaic=close_mosaic,
                plots=plots, exist_ok=False)
    args.update({k: v for k, v in dict(device=device, project=project, name=name).items() if v is not None})
    if extra.get("resume"):
        # Ultralytics resumes with the run's own settings from last.pt and takes a few given ones (batch, device,
        # close_mosaic, ...); softlabel's option defaults must not reach it as if the user had given them
        args = {k: v for k, v in args.items() if k in typed or k in ("data", "imgsz")}  # data, imgsz: the cache's
    args.update(extra)
    if cohort:
        from softlabel.train.cohort import run_cohort

        rows = run_cohort(list(students), list(sweeps), settings, args, echo=click.echo)
    else:
        rows = train_students(list(students), settings, **args)
    click.echo(render_table(rows))


def _check_train_sources(cache: str | None, teacher: str | None, data: str | None, imgsz: int | None) -> tuple[str, int]:
    """The cache (or live teacher) against the data and image size, before anything is written;
    returns the data.yaml (a cache's own by default) and the image size."""
    from softlabel.checks import check_class_names
    from softlabel.data import load_data_yaml

    if cache:
        from softlabel.cache.reader import CacheReader

        reader = CacheReader(cache)
        desc = reader.description
        data = data or desc.data.yaml
        spec = load_data_yaml(data)
        recorded = desc.augment.imgsz
        if imgsz is not None and imgsz != recorded:
            raise UserError(f"{cache}: the cache was dumped at imgsz {recorded} but training asks for imgsz {imgsz} (--imgsz)")
        check_class_names(list(desc.teacher.names), list(spec.names), cache, spec.yaml_path)
        reader.require_complete()
        return data, recorded
    if not data:
        raise UserError("--data is needed with --teacher (a cache records its own data.yaml)")
    spec = load_data_yaml(data)
    from softlabel.teacher import describe, read_checkpoint

    model, _ = read_checkpoint(teacher, "teacher")  # the classes only: the trainer loads it again and hashes it
    check_class_names(describe(model, teacher).names, list(spec.names), teacher, spec.yaml_path)
    return data, imgsz or 640


@main.command()
@click.option("--out", default=None, help="Run folder: dataset, teacher, cache, students, results.json, demo.png [default: runs/demo].")
@click.option("--teacher", default=None, help="Teacher checkpoint (.pt, 10 digit classes) to use instead of training one.")
@click.option("--quick", is_flag=True, help="A 1-2 minute smoke run: tiny data, images and epochs; the numbers mean nothing.")
@click.option("--epochs", default=None, type=int, help="Epochs for each student [default: 12; --quick: 3].")
@click.option("--teacher-epochs", default=None, type=int, help="Epochs for the teacher [default: 25; --quick: 3].")
@click.option("--imgsz", default=None, type=int, help="Image size of every model, multiple of 32 [default: 128; --quick: 64].")
@click.option("--student", default=None, help="Student model: a name (yolov8n, yolo11n, ...; from random weights here) or a model .yaml [default: yolov8n].")
@click.option("--teacher-model", default=None, help="Teacher model to train: a name or a model .yaml [default: yolov8s].")
@click.option("--device", default=None, help="Training device: cpu, 0, cuda:N; latency is always measured on the CPU [default: cpu].")
@click.option("--seed", default=None, type=int, help="Seed of the dataset, the augmentation replay and training [default: 0].")
@click.option("--distill", default=None, help="Distillation config: a built-in name (default, accurate, logits_only) or a YAML path [default: default].")
def demo(out, teacher, quick, epochs, teacher_epochs, imgsz, student, teacher_model, device, seed, distill):
    """Distil a student on real handwritten digits, offline on a CPU, and compare it with the same student trained plainly.

    Builds detection scenes from scikit-learn's digits, trains a teacher (unless --teacher), dumps its
    cache, trains the student with and without distillation, then prints a table and writes
    results.json and a plot into the run folder. A second run reuses the dataset, teacher and cache.
    """
    from softlabel.demo import demo_settings, render_table, run_demo

    settings = demo_settings(quick, out=out, teacher=teacher, epochs=epochs, teacher_epochs=teacher_epochs, imgsz=imgsz,
                             student=student, teacher_model=teacher_model, device=device, seed=seed, distill=distill)
    result = run_demo(settings, echo=click.echo)
    click.echo("")
    click.echo(render_table(result))
    click.echo(f"wall time {result['wall_seconds'] / 60:.1f} min; plot {result['plot']}; table {result['run_dir']}/results.json")
    click.echo(f"run directory: {result['run_dir']}")


@main.command()
@click.option("--model", required=True, help="Ultralytics detection checkpoint (.pt) to prune (YOLOv8, YOLO11).")
@click.option("--out", required=True, help="Pruned checkpoint to write (.pt); YOLO(out) loads it, softlabel train fine-tunes it.")
@click.option("--ratio", default=0.3, show_default=True, type=float,
              help="Fraction of the channels removed from every prunable layer (per layer, not ranked globally), between 0 and 1.")
@click.option("--imgsz", default=None, type=int, help="Example input size for tracing and GFLOPs [default: the checkpoint's training imgsz, or 640].")
@click.option("--importance", default="l2", show_default=True, help="How channels are ranked: l2 or l1 (norm of their weights), bn (BatchNorm scale).")
@click.option("--prune-head/--ignore-head", default=True, show_default=True,
              help="Prune the Detect head's inner channels too; its outputs (4*reg_max box bins, nc classes) never change.")
@click.option("--round-to", default=None, type=int, help="Keep channel counts multiples of N, e.g. 8 for CPU vector units [default: the exact ratio].")
def prune(model, out, ratio, imgsz, importance, prune_head, round_to):
    """Remove channels from a detector (structured pruning with torch-pruning) and print params and GFLOPs before/after.

    Residual and concatenated branches stay consistent and the Detect head keeps its output shapes.
    The pruned checkpoint keeps its narrower layers when fine-tuned with 'softlabel train --student'.
    """
    from softlabel.prune import prune_checkpoint, render

    click.echo(render(prune_checkpoint(model, out, ratio, imgsz=imgsz, importance=importance.strip().lower(),
                                       prune_head=prune_head, round_to=round_to)))


@main.command()
@click.option("--model", required=True, help="Ultralytics detection checkpoint (.pt), pruned or not.")
@click.option("--format", "fmt", default="onnx", show_default=True, help="onnx (run with ONNX Runtime) or openvino.")
@click.option("--int8", is_flag=True, help="Also export an INT8 model, calibrated on the training images of --data.")
@click.option("--data", default=None, help="data.yaml: INT8 calibration (train split), latency and mAP (val split). Needed with --int8.")
@click.option("--imgsz", default=None, type=int, help="Export input size [default: the checkpoint's training imgsz, or 640].")
@click.option("--out", default=None, help="Folder for the exports [default: MODEL_STEM_FORMAT beside the model].")
@click.option("--calib-images", default=300, show_default=True, help="Training images for INT8 calibration, spread over the split.")
@click.option("--runs", default=50, show_default=True, help="Timed single-image predictions per model; the median is reported.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export(model, fmt, int8, data, imgsz, out, calib_images, runs, as_json):
    """Export to ONNX or OpenVINO (FP32, and INT8 with --int8); report file size, CPU latency and mAP of each."""
    from softlabel.export import render, run_export

    report = run_export(model, fmt, int8=int8, data=data, imgsz=imgsz, out=out, calib_images=calib_images, runs=runs)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else render(report))


if __name__ == "__main__":
    main()
