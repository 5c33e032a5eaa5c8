"""`softlabel demo`: the whole story on a real dataset that ships with scikit-learn, offline, on a CPU.

Builds the digits scenes (softlabel.digits), trains a teacher, dumps its cache, trains one student
with distillation from the cache and the same student without, then compares the two (and the
teacher) in a table, a results.json and a plot. The dataset, the teacher and the cache are kept in
the run folder with a manifest of the settings that made them, so a second run with the same
settings reuses them and only trains the students again. benchmarks/accuracy.py reuses the steps.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

# The demo promises to run without a network: Ultralytics reads this once, when first imported.
os.environ.setdefault("YOLO_OFFLINE", "1")

from softlabel.digits import DigitsSettings, ensure_digits  # noqa: E402
from softlabel.errors import UserError  # noqa: E402

QUICK_NOTICE = "QUICK RUN: tiny data, tiny images and a few epochs; these numbers mean nothing."
MANIFEST_FORMAT = 1
Echo = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters that every model of a comparison shares: only the teacher signal differs."""

    imgsz: int
    batch: int
    device: str = "cpu"
    close_mosaic: int = 3  # last epochs without mosaic
    optimizer: str = "AdamW"
    lr0: float = 0.002
    warmup_epochs: float = 1.0
    fliplr: float = 0.0  # handwriting is not mirror-symmetric: a flipped 2 is no digit at all
    # nominal batch size: Ultralytics accumulates gradients over nbs images per optimizer step (its default
    # is 64). None means the batch itself, one step per batch: short runs on small data otherwise take
    # too few steps to learn anything
    nbs: int | None = None

    def train_args(self, epochs: int, seed: int, project: Path, name: str) -> dict[str, Any]:
        """Ultralytics' train() arguments."""
        return dict(
            epochs=epochs, imgsz=self.imgsz, batch=self.batch, nbs=self.nbs or self.batch, device=self.device,
            workers=0 if self.device == "cpu" else 4, seed=seed, deterministic=True,
            close_mosaic=min(self.close_mosaic, epochs - 1), optimizer=self.optimizer, lr0=self.lr0,
            warmup_epochs=self.warmup_epochs, fliplr=self.fliplr, plots=False,
            project=str(Path(project).resolve()), name=name, exist_ok=True,
        )

    def write_augment(self, path: Path) -> Path:
        """The replay's augmentation config, matching what Ultralytics does with these arguments."""
        import yaml

        from softlabel.augment import AugmentConfig

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(AugmentConfig(fliplr=self.fliplr, close_mosaic=self.close_mosaic).to_dict(), sort_keys=False))
        return path

    def identity(self) -> dict[str, Any]:
        """What makes two trainings with this recipe the same, for reuse manifests (the device does not;
        an unset nbs is left out, so manifests written before the field existed still match)."""
        return {k: v for k, v in asdict(self).items() if k != "device" and not (k == "nbs" and v is None)}


@dataclass(frozen=True)
class DemoSettings:
    out: str = "runs/demo"
    teacher: str | None = None  # a checkpoint to use instead of training one
    quick: bool = False
    epochs: int = 12
    teacher_epochs: int = 25
    imgsz: int = 128
    student: str = "yolov8n"
    teacher_model: str = "yolov8s"
    device: str = "cpu"
    seed: int = 0
    distill: str | None = None
    train_scenes: int = 300
    val_scenes: int = 100
    batch: int = 8
    close_mosaic: int = 2
    views: int = 5  # mosaic views in the cache: student epoch e replays view e mod views
    latency_runs: int = 50

    @property
    def data(self) -> DigitsSettings:
        return digits_for(self.imgsz, self.train_scenes, self.val_scenes, self.seed)

    @property
    def recipe(self) -> Recipe:
        return Recipe(imgsz=self.imgsz, batch=self.batch, device=self.device, close_mosaic=self.close_mosaic)


QUICK = dict(quick=True, epochs=3, teacher_epochs=3, imgsz=64, train_scenes=32, val_scenes=12, batch=8, close_mosaic=1, views=1, latency_runs=10)


def digits_for(imgsz: int, train_scenes: int, val_scenes: int, seed: int, classes: tuple[int, ...] = ()) -> DigitsSettings:
    """Scenes about the size of the model input, with digits from a tenth to two fifths of it (16-64 px at 160);
    `classes` keeps only those digits (all ten when empty)."""
    return DigitsSettings(n_train=train_scenes, n_val=val_scenes, canvas=imgsz, min_digit=max(8, imgsz // 10),
                          max_digit=imgsz * 2 // 5, seed=seed, classes=tuple(classes))


def demo_settings(quick: bool = False, **given: Any) -> DemoSettings:
    """The defaults, or the --quick ones, with whatever the user gave (None means not given) on top."""
    base = replace(DemoSettings(), **QUICK) if quick else DemoSettings()
    s = replace(base, **{k: v for k, v in given.items() if v is not None})
    if s.imgsz < 32 or s.imgsz % 32:
        raise UserError(f"--imgsz {s.imgsz} must be a positive multiple of 32")
    if s.epochs < 1 or s.teacher_epochs < 1:
        raise UserError("--epochs and --teacher-epochs must be at least 1")
    if s.teacher and not Path(s.teacher).is_file():
        raise UserError(f"{s.teacher}: teacher checkpoint not found")
    if s.distill:
        from softlabel.distill.config import load_distill

        load_distill(s.distill)  # a built-in name or a YAML file; anything else stops here
    return s


# -- reuse ------------------------------------------------------------------------------------------


def manifest_matches(path: Path, wanted: dict) -> bool:
    try:
        return json.loads(path.read_text()) == wanted
    except (OSError, json.JSONDecodeError):
        return False


def write_manifest(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


def checkpoint_arch(weights: str | Path) -> str:
    """The architecture a checkpoint was built from (yolov8s, ...): a given best.pt names nothing by its file name."""
    from softlabel.teacher import load_model

    return load_model(weights)[1].arch


def weights_of(run: str | Path) -> Path:
    """An Ultralytics run's best checkpoint (last.pt if it never validated)."""
    best = Path(run) / "weights" / "best.pt"
    return best if best.is_file() else Path(run) / "weights" / "last.pt"


# -- steps ------------------------------------------------------------------------------------------


def from_scratch(model: str) -> str:
    """The demo trains from random weights and offline: a bare name means its yaml, not the pretrained checkpoint."""
    return model if Path(model).suffix else f"{model}.yaml"


def ensure_teacher(run: Path, model: str, epochs: int, recipe: Recipe, seed: int, data_yaml: Path, data_id: dict,
                   echo: Echo = print, role: str = "teacher") -> tuple[Path, float | None]:
    """Train a model plainly (a teacher, or a student's pretraining: `role` names it) in `run`, or reuse the one
    a run with the same settings left there. Returns its checkpoint and the seconds spent training (None when reused)."""
    from softlabel.train import resolve_student

    wanted = {"format": MANIFEST_FORMAT, "model": model, "epochs": epochs, "seed": seed, "data": data_id,
              "recipe": recipe.identity()}
    if Path(model).is_file():  # training on from a checkpoint: a retrained checkpoint at the same path is another start
        from softlabel.teacher import file_sha256

        wanted["model_sha256"] = file_sha256(Path(model))
    manifest = run / "teacher.json"
    if manifest_matches(manifest, wanted) and weights_of(run).is_file():
        echo(f"{role}: reused {weights_of(run)} ({model}, {epochs} epochs)")
        return weights_of(run), None
    shutil.rmtree(run, ignore_errors=True)
    echo(f"{role}: training {model} for {epochs} epochs at imgsz {recipe.imgsz} ...")
    yolo = resolve_student(from_scratch(model))
    start = time.time()
    yolo.train(data=str(data_yaml), **recipe.train_args(epochs, seed, run.parent, run.name))
    seconds = time.time() - start
    write_manifest(manifest, wanted)  # last: an interrupted training leaves no manifest and is redone
    echo(f"{role}: trained in {seconds:.0f} s -> {weights_of(run)}")
    return weights_of(run), seconds


def ensure_cache(store: Path, teacher: Path, data_yaml: Path, data_id: dict, recipe: Recipe, views: int, close_views: int,
                 seed: int, echo: Echo = print, **storage: Any) -> tuple[float, bool]:
    """Dump the teacher into `store` unless a dump of the same teacher, data and settings is there
    (an interrupted one resumes). `storage` holds DumpSettings' storage options (precision, head_topk,
    head_floor, feature_layout, feature_rows), default when empty. Returns the seconds spent and whether the store was already complete."""
    from softlabel.cache.schema import SCHEMA_VERSION
    from softlabel.dump import DumpSettings, resolve_head, run_dump
    from softlabel.heads import head_spec
    from softlabel.teacher import file_sha256, read_checkpoint

    augment = recipe.write_augment(store.parent / f"{store.stem}.augment.yaml")
    head = resolve_head(DumpSettings(teacher="", data="", out="", **storage), head_spec(read_checkpoint(teacher)[0]).reg_max)
    wanted = {"format": MANIFEST_FORMAT, "teacher_sha256": file_sha256(teacher), "data": data_id, "imgsz": recipe.imgsz,
              "views": views, "close_views": close_views, "seed": seed, "augment": augment.read_text(),
              "storage": {"precision": head.precision, "head_topk": head.head_topk, "head_floor": head.head_floor,
                          "feature_layout": head.feature_layout, "feature_rows": head.feature_rows, "schema": SCHEMA_VERSION}}
    if storage.get("branch"):  # only when chosen, so manifests written before the option existed still match
        wanted["storage"]["branch"] = storage["branch"]
    if head.box_precision:  # only when apart, for the same reason
        wanted["storage"]["box_precision"] = head.box_precision
    manifest = store.parent / f"{store.stem}.json"
    same = manifest_matches(manifest, wanted) and store.exists()
    write_manifest(manifest, wanted)
    if not same:
        echo(f"cache: dumping {views} mosaic + {close_views} closing views of every training image ...")
    start = time.time()
    result = run_dump(DumpSettings(
        teacher=str(teacher), data=str(data_yaml), out=str(store), views=views, close_views=close_views, imgsz=recipe.imgsz,
        batch=recipe.batch, device=recipe.device, seed=seed, augment=str(augment), overwrite=not same, progress=False,
        **storage,
    ))
    seconds = time.time() - start
    if result.samples_done == 0:
        echo(f"cache: reused {store}")
    else:
        echo(f"cache: {result.samples_done} sample-views written to {store} in {seconds:.0f} s")
    return seconds, result.samples_done == 0


def train_student(student: str, recipe: Recipe, data_yaml: Path, epochs: int, seed: int, project: Path, name: str,
                  **extra: Any) -> tuple[Path, float]:
    """One student run, always afresh; `extra` carries the teacher signal (trainer=..., distill_model=...)."""
    from softlabel.train import resolve_student

    shutil.rmtree(project / name, ignore_errors=True)
    model = resolve_student(from_scratch(student))
    start = time.time()
    model.train(data=str(data_yaml), **extra, **recipe.train_args(epochs, seed, project, name))
    return Path(model.trainer.save_dir), time.time() - start


def validate(weights: str | Path, data_yaml: Path, recipe: Recipe, project: Path, name: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) of a checkpoint on the data's val split."""
    from ultralytics import YOLO

    metrics = YOLO(str(weights)).val(data=str(data_yaml), imgsz=recipe.imgsz, batch=recipe.batch, device=recipe.device,
                                     plots=False, verbose=False, project=str(Path(project).resolve()), name=name, exist_ok=True)
    return float(metrics.box.map50), float(metrics.box.map)


def measure_latencies(weights: list[str | Path], image: Path, imgsz: int, runs: int, warmup: int = 5) -> list[float]:
    """Median milliseconds of one single-image prediction on the CPU per checkpoint, pre- and
    post-processing included. The models take turns, so a busy spell on a shared machine slows all alike."""
    import cv2
    from ultralytics import YOLO

    models = [YOLO(str(w)) for w in weights]
    img = cv2.imread(str(image))
    times: list[list[float]] = [[] for _ in models]
    for i in range(warmup + runs):
        for model, spent in zip(models, times):
            start = time.perf_counter()
            model.predict(img, imgsz=imgsz, device="cpu", verbose=False)
            if i >= warmup:
                spent.append((time.perf_counter() - start) * 1000)
    return [float(statistics.median(t)) for t in times]


@dataclass
class ModelRow:
    role: str  # teacher, distilled, plain
    model: str
    weights: str
    params: int
    gflops: float
    map50: float
    map50_95: float
    latency_ms: float
    train_seconds: float | None = None
    run: str | None = None


def evaluate(role: str, name: str, weights: Path, data_yaml: Path, recipe: Recipe, out: Path) -> ModelRow:
    """Validate a checkpoint on the val scenes and count its parameters and GFLOPs (latency comes later)."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    map50, map50_95 = validate(weights, data_yaml, recipe, out / "val", role)
    model = YOLO(str(weights)).model
    return ModelRow(role=role, model=name, weights=str(weights), params=int(get_num_params(model)),
                    gflops=float(get_flops(model, recipe.imgsz)), map50=map50, map50_95=map50_95, latency_ms=float("nan"))


# -- report ------------------------------------------------------------------------------------------


def read_results_csv(run: str | Path) -> dict[str, list[float]]:
    """An Ultralytics results.csv as columns of floats (older versions pad column names with spaces)."""
    path = Path(run) / "results.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k.strip(), []).append(float(v))
            except (TypeError, ValueError):
                pass
    return cols


def plot_curves(rows: list[ModelRow], path: Path, title: str) -> Path:
    """Validation mAP50-95 per epoch of both students, and the distillation terms per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    by_role = {r.role: r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for role, colour in (("distilled", "tab:blue"), ("plain", "tab:orange")):
        cols = read_results_csv(by_role[role].run) if role in by_role and by_role[role].run else {}
        if "metrics/mAP50-95(B)" in cols:
            left.plot(cols["epoch"], cols["metrics/mAP50-95(B)"], marker="o", ms=3, color=colour, label=f"{by_role[role].model} {role}")
    if "teacher" in by_role:
        left.axhline(by_role["teacher"].map50_95, color="grey", ls="--", label=f"teacher {by_role['teacher'].model}")
    left.set(xlabel="epoch", ylabel="val mAP50-95", title="validation mAP50-95")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend()
    cols = read_results_csv(by_role["distilled"].run) if "distilled" in by_role and by_role["distilled"].run else {}
    for term in ("kd_cls", "kd_box", "kd_feat"):
        if f"train/{term}" in cols:
            right.plot(cols["epoch"], cols[f"train/{term}"], marker="o", ms=3, label=term)
    right.set(xlabel="epoch", ylabel="loss (weighted)", title="distillation terms (distilled student, train)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(alpha=0.3)
    if right.lines:
        right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_table(result: dict) -> str:
    head = f"{'model':<22}{'params':>12}{'GFLOPs':>9}{'mAP50':>8}{'mAP50-95':>10}{'CPU ms/img':>12}"
    lines = [result["title"], head, "-" * len(head)]
    for r in result["rows"]:
        label = f"{r['model']} {r['role']}"
        lines.append(f"{label:<22}{r['params']:>12,}{r['gflops']:>9.2f}{r['map50']:>8.3f}{r['map50_95']:>10.3f}{r['latency_ms']:>12.1f}")
    lines.append("-" * len(head))
    if result["quick"]:
        lines.append(QUICK_NOTICE)
    lines.append(f"mAP on {result['val_scenes']} val scenes of held-out handwriting; CPU ms/img: median of "
                 f"{result['latency_runs']} single-image predictions at imgsz {result['imgsz']}, pre/post-processing included")
    return "\n".join(lines)


# -- the whole run -----------------------------------------------------------------------------------


def run_demo(s: DemoSettings, echo: Echo = print) -> dict:
    """Run every step, write results.json and demo.png under s.out, and return what results.json holds."""
    from softlabel.distill.config import load_distill
    from softlabel.train import make_trainer, resolve_student

    load_distill(s.distill)  # bad input stops here, before anything is built
    resolve_student(from_scratch(s.student))
    if not s.teacher:
        try:
            resolve_student(from_scratch(s.teacher_model))
        except UserError as e:
            raise UserError(f"--teacher-model: {e}") from None
    start = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = s.recipe

    t = time.time()
    data_yaml, reused = ensure_digits(out / "data", s.data)
    data_seconds = time.time() - t
    if reused:
        echo(f"dataset: reused {data_yaml.parent} ({s.train_scenes} train / {s.val_scenes} val scenes)")
    else:
        echo(f"dataset: built {s.train_scenes} train / {s.val_scenes} val digit scenes in {time.time() - t:.0f} s -> {data_yaml}")
    data_id = s.data.to_dict()

    if s.teacher:
        echo(f"teacher: using {s.teacher}")
        teacher, teacher_seconds = Path(s.teacher), None
    else:
        teacher, teacher_seconds = ensure_teacher(out / "teacher", s.teacher_model, s.teacher_epochs, recipe, s.seed, data_yaml, data_id, echo)
    close_views = 1 if min(s.close_mosaic, s.epochs - 1) > 0 else 0
    store = out / "cache.zarr"
    dump_seconds, cache_reused = ensure_cache(store, teacher, data_yaml, data_id, recipe, s.views, close_views, s.seed, echo)

    students = out / "students"
    echo(f"student: training {s.student} with distillation from the cache, {s.epochs} epochs ...")
    trainer = make_trainer(cache=str(store.resolve()), distill_config=s.distill)
    distilled_run, distilled_seconds = train_student(s.student, recipe, data_yaml, s.epochs, s.seed, students, "distilled", trainer=trainer)
    echo(f"student: training {s.student} without distillation (plain Ultralytics), {s.epochs} epochs ...")
    plain_run, plain_seconds = train_student(s.student, recipe, data_yaml, s.epochs, s.seed, students, "plain")

    echo("evaluating: validation mAP and CPU latency of each model ...")
    t = time.time()
    image = sorted((data_yaml.parent / "images" / "val").iterdir())[0]
    teacher_name = checkpoint_arch(teacher) if s.teacher else Path(s.teacher_model).stem
    student_name = Path(s.student).stem
    rows = [
        evaluate("teacher", teacher_name, teacher, data_yaml, recipe, out),
        evaluate("distilled", student_name, weights_of(distilled_run), data_yaml, recipe, out),
        evaluate("plain", student_name, weights_of(plain_run), data_yaml, recipe, out),
    ]
    for row, ms in zip(rows, measure_latencies([r.weights for r in rows], image, s.imgsz, s.latency_runs)):
        row.latency_ms = ms
    eval_seconds = time.time() - t
    rows[0].train_seconds = teacher_seconds
    rows[1].train_seconds, rows[1].run = distilled_seconds, str(distilled_run)
    rows[2].train_seconds, rows[2].run = plain_seconds, str(plain_run)

    title = (f"softlabel demo: {teacher_name} teacher -> {student_name} student, {s.train_scenes} digit scenes, "
             f"imgsz {s.imgsz}, {s.epochs} student epochs" + (" (quick)" if s.quick else ""))
    plot = plot_curves(rows, out / "demo.png", title)
    result = {
        "title": title,
        "quick": s.quick,
        "notice": QUICK_NOTICE if s.quick else None,
        "rows": [asdict(r) for r in rows],
        "teacher": asdict(rows[0]),
        "students": {r.role: asdict(r) for r in rows[1:]},
        "plot": str(plot),
        "run_dir": str(out),
        "imgsz": s.imgsz,
        "val_scenes": s.val_scenes,
        "latency_runs": s.latency_runs,
        "settings": asdict(s),
        "recipe": asdict(recipe),
        "wall_seconds": round(time.time() - start, 1),
        # what this run made and what it found from an earlier run; seconds per step (teacher: None unless trained)
        "made": {"dataset": "reused" if reused else "built", "teacher": "given" if s.teacher else "reused" if teacher_seconds is None else "trained",
                 "cache": "reused" if cache_reused else "written"},
        "step_seconds": {"dataset": round(data_seconds, 1), "teacher": teacher_seconds, "dump": round(dump_seconds, 1),
                         "distilled": round(distilled_seconds, 1), "plain": round(plain_seconds, 1), "evaluate": round(eval_seconds, 1)},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
