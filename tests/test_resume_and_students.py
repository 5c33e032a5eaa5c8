"""What a new user does: resume a run as Ultralytics users do, train several students where one
cannot learn from the teacher, give a student yaml that is not a detector."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from conftest import assert_clean_error, run_cli

IMGSZ = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("resume") / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", IMGSZ, "--batch", 4,
                "--shard-size", 4, "--views", 2, "--close-views", 1, "--quiet")
    assert r.exit_code == 0, r.output
    return out


class Interrupted(Exception):
    pass


def test_resume_keeps_the_runs_settings_and_adapters(tmp_path, store, monkeypatch):
    """Interrupted after its first epoch, a run given with non-default batch, close_mosaic and epochs
    resumes from last.pt with those, not with softlabel's option defaults (batch 16, close_mosaic 10)."""
    import torch

    from softlabel.train.trainer import DistillTrainer

    save = DistillTrainer.save_model

    def save_then_stop(self):
        out = save(self)
        if self.epoch == 0:
            raise Interrupted
        return out

    monkeypatch.setattr(DistillTrainer, "save_model", save_then_stop)
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", store, "--epochs", 3, "--batch", 4, "--close-mosaic", 1,
                "--device", "cpu", "--project", tmp_path / "runs", "--name", "r")
    assert isinstance(r.exception, Interrupted), r.output
    monkeypatch.setattr(DistillTrainer, "save_model", save)
    weights = tmp_path / "runs" / "r" / "weights"
    # the adapters travel in last.pt with the student; the only class of ours the file names is the wrapper,
    # which rebuilds them from plain data, so Ultralytics' safe load reads it
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()  # listed only while nothing is allowed: every global the file names
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(str(weights / "last.pt"))
    finally:
        torch.serialization.add_safe_globals(allowed)
    ours = [g for g in named if g.startswith("softlabel")]
    assert ours == ["softlabel.distill.model.DistillModel"]
    from ultralytics.nn.tasks import torch_safe_load

    adapters = torch_safe_load(str(weights / "last.pt"), safe_only=True)[0]["ema"].projector.state_dict()
    seen = {}
    load = DistillTrainer.resume_training

    def spy(self, ckpt):
        load(self, ckpt)
        seen.update(start=self.start_epoch, batch=self.args.batch, close_mosaic=self.args.close_mosaic, epochs=self.epochs,
                    state={k: v.detach().clone() for k, v in self.distiller.state_dict().items()})

    monkeypatch.setattr(DistillTrainer, "resume_training", spy)
    r = run_cli("train", "--student", weights / "last.pt", "--cache", store, "resume=True")
    assert r.exit_code == 0, (r.output[-2000:], r.exception)
    assert (seen["start"], seen["batch"], seen["close_mosaic"], seen["epochs"]) == (1, 4, 1, 3)
    assert adapters and all(torch.equal(seen["state"][k].cpu(), adapters[k].float().cpu()) for k in adapters)
    args = yaml.safe_load((tmp_path / "runs" / "r" / "args.yaml").read_text())
    assert (args["batch"], args["close_mosaic"], args["epochs"]) == (4, 1, 3)
    with open(tmp_path / "runs" / "r" / "results.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3]


@pytest.mark.parametrize("bad, needles", [
    ("yolov8n-p6.yaml", ["yolov8n-p6.yaml", "strides [8, 16, 32, 64]", "[8, 16, 32]"]),
])
def test_every_student_is_checked_before_the_first_trains(bad, needles, tmp_path, store):
    project = tmp_path / "runs"
    r = run_cli("train", "--student", "yolov8n.yaml", "--student", bad, "--student", "yolo11n.yaml", "--cache", store,
                "--epochs", 1, "--device", "cpu", "--project", project)
    assert_clean_error(r, *needles)
    assert not project.exists()  # no student trained, no run folder made


def test_a_yaml_that_is_not_a_detector_is_named_so(tmp_path, store):
    cfg = yaml.safe_load((Path(__import__("ultralytics").__file__).parent / "cfg/models/v8/yolov8.yaml").read_text())
    cfg["head"] = [[-1, 1, "nn.Upsample", [None, 2, "nearest"]]]
    odd = tmp_path / "odd.yaml"
    odd.write_text(yaml.safe_dump(cfg))
    r = run_cli("train", "--student", odd, "--cache", store, "--epochs", 1, "--device", "cpu", "--project", tmp_path / "runs")
    assert_clean_error(r, "odd.yaml", "not a model yaml Ultralytics can tell the task of")
    assert "None" not in r.stderr
