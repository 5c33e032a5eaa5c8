"""Train several students in turn against one teacher source, and the table that sums them up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softlabel.student import resolve_student
from softlabel.train.cachecheck import check_student_fits
from softlabel.train.trainer import make_trainer


@dataclass
class StudentResult:
    student: str
    params: int
    gflops: float
    map50: float
    map50_95: float
    epochs: int
    seconds: float
    save_dir: str
    status: str = "done"  # done | stopped early | failed (a cohort goes on without a failed student)
    error: str = ""

    @classmethod
    def failed(cls, student: str, save_dir: str, error: str) -> "StudentResult":
        nan = float("nan")
        return cls(student, 0, nan, nan, nan, 0, nan, save_dir, status="failed", error=error)


def result_of(name: str, model, metrics, imgsz: int, seconds: float) -> StudentResult:
    """The table row of a student that `model.train` has just trained."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    inner = model.trainer.best if Path(model.trainer.best).is_file() else model.trainer.last
    best = YOLO(str(inner)).model
    return StudentResult(
        student=name,
        params=int(get_num_params(best)),
        gflops=float(get_flops(best, imgsz)),
        map50=float(metrics.box.map50) if metrics is not None else float("nan"),
        map50_95=float(metrics.box.map) if metrics is not None else float("nan"),
        epochs=int(model.trainer.epoch + 1),
        seconds=seconds,
        save_dir=str(model.trainer.save_dir),
    )


def load_students(students: list[str], trainer_settings: dict[str, Any]) -> list:
    """Every student loaded and checked before any trains: a bad name, or a student that cannot learn from this
    teacher, is refused in one line and no run folder is made."""
    models = [resolve_student(s) for s in students]
    where, teacher = teacher_head(trainer_settings)
    for student, model in zip(students, models):
        check_student_fits(student, model.model, teacher, where)
    return models


def train_students(students: list[str], trainer_settings: dict[str, Any], **train_args: Any) -> list[StudentResult]:
    """Train each student in turn against the same teacher source; Ultralytics' arguments pass through."""
    import time

    models = load_students(students, trainer_settings)
    trainer = make_trainer(**trainer_settings)
    results = []
    for student, model in zip(students, models):
        args = dict(train_args)
        if len(students) > 1 and args.get("name"):
            args["name"] = f"{args['name']}-{Path(student).stem}"
        elif len(students) > 1:
            args["name"] = Path(student).stem
        start = time.time()
        metrics = model.train(trainer=trainer, **args)
        results.append(result_of(student, model, metrics, int(args.get("imgsz", 640)), time.time() - start))
    return results


def teacher_head(settings: dict[str, Any]):
    """(the cache or teacher path, the teacher's description: a cache's TeacherRecord or a live TeacherInfo)."""
    if settings.get("cache"):
        from softlabel.cache.reader import CacheReader

        return settings["cache"], CacheReader(settings["cache"]).description.teacher
    from softlabel.teacher import describe, read_checkpoint

    path = settings["teacher_path"]
    return path, describe(read_checkpoint(path, "teacher")[0], path)


def render_table(rows: list[StudentResult]) -> str:
    width = max([16, *(len(r.student) + 2 for r in rows)])
    head = f"{'student':<{width}}{'params':>12}{'GFLOPs':>9}{'mAP50':>9}{'mAP50-95':>10}{'epochs':>8}{'time':>10}  run"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status == "failed":
            lines.append(f"{r.student:<{width}}  failed: {r.error.splitlines()[-1] if r.error else 'see its run folder'}  {r.save_dir}")
            continue
        note = "" if r.status == "done" else f"  ({r.status})"
        lines.append(
            f"{r.student:<{width}}{r.params:>12,}{r.gflops:>9.2f}{r.map50:>9.4f}{r.map50_95:>10.4f}{r.epochs:>8}{r.seconds:>9.1f}s  {r.save_dir}{note}"
        )
    return "\n".join(lines)
