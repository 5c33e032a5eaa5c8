"""Students named as Ultralytics names them: `yolov8n` is pretrained, `yolov8n.yaml` starts from scratch."""

from __future__ import annotations

import pytest
import torch
import ultralytics.utils
from conftest import NAMES

from softlabel.errors import UserError
from softlabel.student import resolve_student
from softlabel.teacher import save_checkpoint_from_yaml


def _weights(model) -> torch.Tensor:
    return next(model.model.parameters()).detach().float().flatten()


@pytest.fixture
def no_weights_dir(tmp_path, monkeypatch):
    """Ultralytics also looks in its settings' weights folder: point it at an empty one."""
    monkeypatch.setattr(ultralytics.utils, "SETTINGS", {**dict(ultralytics.utils.SETTINGS), "weights_dir": tmp_path / "weights"})


def test_a_name_loads_the_local_pretrained_checkpoint(tmp_path, monkeypatch, no_weights_dir):
    saved = save_checkpoint_from_yaml("yolov8n.yaml", NAMES, tmp_path / "yolov8n.pt")
    monkeypatch.chdir(tmp_path)
    lines = []
    model = resolve_student("yolov8n", warn=lines.append)
    assert lines == []
    assert model.ckpt_path and (tmp_path / "yolov8n.pt").samefile(model.ckpt_path)
    reference = torch.load(saved, map_location="cpu", weights_only=False)["model"]
    assert torch.equal(_weights(model), next(reference.parameters()).detach().float().flatten())
    assert resolve_student("yolov8n.pt", warn=lines.append).ckpt_path == model.ckpt_path


def test_a_yaml_starts_from_scratch(tmp_path, monkeypatch):
    save_checkpoint_from_yaml("yolov8n.yaml", NAMES, tmp_path / "yolov8n.pt")
    monkeypatch.chdir(tmp_path)  # a pretrained file beside it must not be used
    model = resolve_student("yolov8n.yaml", warn=None)
    assert not model.ckpt_path and model.ckpt in (None, {})


def test_offline_name_says_so_in_one_line_and_uses_the_yaml(tmp_path, monkeypatch, no_weights_dir):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("ultralytics.utils.downloads.is_online", lambda: False)
    lines = []
    model = resolve_student("yolov8n", warn=lines.append)
    assert len(lines) == 1 and "yolov8n.pt" in lines[0] and "yolov8n.yaml" in lines[0], lines
    assert not model.ckpt_path and not (tmp_path / "yolov8n.pt").exists()


def test_unknown_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="yolov99z"):
        resolve_student("yolov99z", warn=None)
    with pytest.raises(UserError, match="missing.pt: student checkpoint not found"):
        resolve_student("sub/missing.pt", warn=None)
