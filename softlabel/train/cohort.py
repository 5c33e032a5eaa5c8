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

import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from softlabel.train.cohortfile import cohort_folder, read_manifest, write_manifest
from softlabel.train.members import MEMBER_SETTINGS, Member, expand_members
from softlabel.train.turns import SetupTurns


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
