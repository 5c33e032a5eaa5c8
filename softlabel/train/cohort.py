"""A cohort: several students trained at once, each in its own Ultralytics trainer and thread, on one
stream of replayed, cached batches (softlabel.train.stream).

Each student keeps everything of its own (optimizer, EMA, schedule, AMP scaler, distillation terms,
validation, early stopping, checkpoints, results.csv, run folder) and ends as it would alone: the
students are set up one at a time, each seeding and building its model as a lone run does while no
other thread draws from torch's global generator, and train once all are set up. A student that fails
or stops leaves the stream and the others go on. The cohort folder holds one run folder per student
and cohort.json, from which an interrupted cohort resumes.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from softlabel.errors import UserError

MANIFEST = "cohort.json"
MANIFEST_FORMAT = 1

# arguments that shape the batch stream or the device the students share: one value for the whole cohort
STREAM_KEYS = frozenset({
    "data", "imgsz", "batch", "epochs", "seed", "close_mosaic", "workers", "device", "rect", "multi_scale", "fraction",
    "cache", "resume", "time", "deterministic", "amp", "project", "name", "exist_ok", "single_cls", "classes",
})
# softlabel settings a sweep may vary per student (the others are the cohort's, like the stream keys)
MEMBER_SETTINGS = ("distill_config",)
SWEEP_SETTINGS = {"distill": "distill_config"}


@dataclass(frozen=True)
class Member:
    """One student of a cohort: its run folder name, the student as given, and its own arguments."""

    name: str
    student: str
    overrides: dict[str, Any] = field(default_factory=dict)  # Ultralytics arguments and MEMBER_SETTINGS of its own


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'lr0=0.01,0.005' -> ('lr0', ['0.01', '0.005'])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise UserError(f"--sweep '{text}': expected KEY=VALUE1,VALUE2,... e.g. lr0=0.01,0.005")
    if key in STREAM_KEYS:
        raise UserError(f"--sweep {key}: every student of a cohort reads the same batches, so {key} is one value for all")
    if len(set(items)) != len(items):
        raise UserError(f"--sweep '{text}': a value is given twice")
    return key, items


def expand_members(students: list[str], sweeps: list[str]) -> list[Member]:
    """Every student with every combination of the swept values, named after both (yolov8n-lr0=0.01)."""
    from softlabel.trainargs import parse_train_args

    axes = [parse_sweep(s) for s in sweeps]
    if len({k for k, _ in axes}) != len(axes):
        raise UserError("--sweep: a key is swept twice")
    combos: list[dict[str, str]] = [{}]
    for key, values in axes:
        combos = [{**c, key: v} for c in combos for v in values]
    members = []
    for student in students:
        for combo in combos:
            overrides: dict[str, Any] = {}
            ultralytics = {k: v for k, v in combo.items() if k not in SWEEP_SETTINGS}
            overrides.update(parse_train_args([f"{k}={v}" for k, v in ultralytics.items()]))  # checked as Ultralytics would
            for key, setting in SWEEP_SETTINGS.items():
                if key in combo:
                    from softlabel.distill.config import load_distill

                    load_distill(combo[key])  # a bad config stops here, before any training
                    overrides[setting] = combo[key]
            stem = Path(student).stem
            name = "-".join([stem, *(f"{k}={v}" for k, v in combo.items())])
            members.append(Member(name=name.replace("/", "_"), student=student, overrides=overrides))
    names = [m.name for m in members]
    if len(set(names)) != len(names):  # one student given twice: number the repeats
        seen: dict[str, int] = {}
        renamed = []
        for m in members:
            seen[m.name] = seen.get(m.name, 0) + 1
            renamed.append(Member(f"{m.name}-{seen[m.name]}" if names.count(m.name) > 1 else m.name, m.student, m.overrides))
        members = renamed
    return members


class SetupTurns:
    """Students set up one at a time, then all train. A member that fails in its turn still counts as set up."""

    def __init__(self, n: int) -> None:
        self._gate = threading.Lock()
        self._cond = threading.Condition()
        self._waiting = n

    def turn(self) -> "Turn":
        return Turn(self)

    def _arrive(self) -> None:
        with self._cond:
            self._waiting -= 1
            self._cond.notify_all()

    def _wait_all(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._waiting <= 0)


class Turn:
    def __init__(self, turns: SetupTurns) -> None:
        self.turns = turns
        self.holding = False
        self.arrived = False

    def begin(self) -> None:
        self.turns._gate.acquire()
        self.holding = True

    def done(self) -> None:
        """Called by the trainer once it is set up: the next student's turn; back when every student is set up."""
        self._release()
        self.turns._wait_all()

    def end(self) -> None:
        """The thread is over, whatever happened: never leave the gate held or the others waiting."""
        self._release()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            self.turns._gate.release()
        if not self.arrived:
            self.arrived = True
            self.turns._arrive()


def cohort_folder(project: str | None, name: str | None) -> Path:
    """A fresh cohort folder, as Ultralytics names run folders (name, name2, ...)."""
    from ultralytics.utils.files import increment_path

    root = Path(project) if project else Path("runs") / "detect"
    return Path(increment_path(root / (name or "cohort"), exist_ok=False, mkdir=True))


def write_manifest(folder: Path, members: list[Member], settings: dict[str, Any], args: dict[str, Any],
                   results: dict[str, dict] | None = None) -> None:
    data = {"format": MANIFEST_FORMAT, "members": [asdict(m) for m in members], "settings": settings, "args": args,
            "results": results or {}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: str | Path) -> tuple[list[Member], dict[str, Any], dict[str, Any], dict[str, dict]]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: not a cohort folder (no {MANIFEST}); resume=DIR takes the folder a cohort run printed")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{path}: cohort manifest format {data.get('format')}, this softlabel reads {MANIFEST_FORMAT}")
        members = [Member(**m) for m in data["members"]]
        return members, dict(data["settings"]), dict(data["args"]), dict(data.get("results", {}))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged cohort manifest ({e})") from None


def train_cohort(members: list[Member], settings: dict[str, Any], args: dict[str, Any], folder: Path,
                 done: dict[str, dict] | None = None, echo=print, loaded: dict[str, Any] | None = None) -> list:
    """Train the members at once on one batch stream, in `folder` (written by write_manifest first).

    `done`: results of members an earlier run of this cohort finished; they are reported, not trained again.
    A member with a last.pt in its run folder resumes from it. `loaded`: models already built, by member name.
    Returns runner.StudentResult rows in member order."""
    from softlabel.student import resolve_student
    from softlabel.train.runner import StudentResult, result_of
    from softlabel.train.stream import BatchSlot, SharedStream
    from softlabel.train.trainer import make_trainer

    done = dict(done or {})
    todo = [m for m in members if m.name not in done]
    # every student loads before any trains: from its last.pt where an earlier run of the cohort left one
    loaded = loaded or {}
    models = {m.name: loaded.get(m.name) or resolve_student(str(_last(folder, m)) if _last(folder, m).is_file() else m.student)
              for m in todo}
    stream = SharedStream([m.name for m in todo])
    shared = BatchSlot()  # what every student uses once per cohort: the live teacher
    turns = SetupTurns(len(todo))
    outcome: dict[str, Any] = {}
    lock = threading.Lock()

    def run(member: Member, alone: bool = False) -> None:
        turn = None if alone else turns.turn()
        start = time.time()
        try:
            cohort = {} if alone else dict(cohort=stream, cohort_member=member.name, cohort_shared=shared, cohort_turn=turn)
            if turn is not None:
                turn.begin()
            own = {k: v for k, v in member.overrides.items() if k not in MEMBER_SETTINGS}
            trainer = make_trainer(**{**settings, **{k: v for k, v in member.overrides.items() if k in MEMBER_SETTINGS}}, **cohort)
            model = resolve_student(str(_last(folder, member))) if alone else models[member.name]
            if _last(folder, member).is_file():  # an earlier run stopped here: Ultralytics resumes it with its own settings
                metrics = model.train(trainer=trainer, resume=True)
            else:
                metrics = model.train(trainer=trainer, **{**args, **own, "project": str(folder), "name": member.name, "exist_ok": True})
            row = result_of(member.name, model, metrics, int(args.get("imgsz", 640)), time.time() - start)
            stopped = model.trainer.epoch + 1 < model.trainer.epochs
            status = "stopped early" if stopped else "done"
            with lock:
                outcome[member.name] = (row, f"{status}, alone after running out of memory" if alone else status, "")
        except BaseException as e:  # noqa: BLE001 - one student's failure must not stop the others
            oom = "out of memory" in str(e).lower() and not alone and _last(folder, member).is_file()
            echo(f"cohort: {member.name} failed: {type(e).__name__}: {e}" + ("; it resumes alone when the others are done" if oom else ""))
            with lock:
                outcome[member.name] = (None, "out of memory" if oom else "failed",
                                        "".join(traceback.format_exception_only(type(e), e)).strip())
            (folder / member.name).mkdir(parents=True, exist_ok=True)
            (folder / member.name / "error.txt").write_text(traceback.format_exc())
        finally:
            if turn is not None:
                turn.end()
            stream.leave(member.name)

    threads = [threading.Thread(target=run, args=(m,), name=f"softlabel-{m.name}", daemon=True) for m in todo]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)  # a short wait keeps Ctrl-C working in the main thread
    finally:
        stream.close()
    # a student that ran out of memory beside the others (after the first epoch, where Ultralytics no longer halves
    # the batch) continues alone from its last.pt once they are done and their memory is free
    for m in todo:
        if outcome.get(m.name, (None, ""))[1] == "out of memory":
            echo(f"cohort: {m.name} resumes alone from {_last(folder, m)}")
            run(m, alone=True)
    rows = []
    for m in members:
        if m.name in done:
            rows.append(StudentResult(**done[m.name]))
            continue
        row, status, error = outcome.get(m.name, (None, "failed", "did not start"))
        if row is None:
            row = StudentResult.failed(m.name, str(folder / m.name), error)
            status = "failed"
        row.status = status
        rows.append(row)
    return rows


def run_cohort(students: list[str], sweeps: list[str], settings: dict[str, Any], args: dict[str, Any],
               resume: str | None = None, echo=print) -> list:
    """The `softlabel train --cohort` command: check every student up front, make (or reopen, with `resume`) the
    cohort folder, train, and record each finished student in the manifest."""
    from softlabel.train.runner import load_students

    loaded: dict[str, Any] = {}
    if resume:
        folder = Path(resume)
        members, settings, args, done = read_manifest(folder)
        echo(f"cohort: resuming {folder} ({len(done)} of {len(members)} students finished)")
    else:
        members = expand_members(students, sweeps)
        # a bad student is refused before any trains or any folder is made; each member gets a model of its own
        loaded = dict(zip([m.name for m in members], load_students([m.student for m in members], settings)))
        folder = cohort_folder(args.get("project"), args.get("name"))
        args = {k: v for k, v in args.items() if k not in ("project", "name", "exist_ok")}
        done = {}
        write_manifest(folder, members, settings, args)
        echo(f"cohort: {len(members)} students on one batch stream in {folder}")
    rows = train_cohort(members, settings, args, folder, done, echo, loaded)
    finished = {r.student: asdict(r) for r in rows if r.status != "failed"}
    write_manifest(folder, members, settings, args, finished)
    return rows


def _last(folder: Path, member: Member) -> Path:
    return folder / member.name / "weights" / "last.pt"
