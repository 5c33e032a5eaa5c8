"""Shared fixtures: a small Ultralytics-format dataset drawn in the test, and tiny teachers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softlabel.toydata import NAMES, make_dataset  # noqa: F401  (tests import it from here)

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")


def run_cli(*args):
    """Run the softlabel CLI in-process, every argument as a string."""
    from click.testing import CliRunner

    from softlabel.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def save_teacher(path: Path, cfg: str = "yolov8n.yaml", nc: int = 3) -> Path:
    """Build a model from its yaml (no download) and save it as an Ultralytics checkpoint."""
    from softlabel.teacher import save_checkpoint_from_yaml

    return save_checkpoint_from_yaml(cfg, NAMES[:nc], path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")
