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


def assert_clean_error(result, *needles) -> None:
    """A refused command: exit code 2, one line on stderr that names every needle, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:], result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def reseal(location, view: str, indices) -> None:
    """Seal altered records again, as a store that lies consistently would: what only the live teacher can catch."""
    import numpy as np
    import zarr

    from softlabel.cache.digest import record_digest
    from softlabel.cache.reader import CacheReader

    layout = CacheReader(str(location)).layout
    group = zarr.open_group(str(location), mode="r+")
    for i in indices:
        stored = {name[len(view) + 1 :]: np.asarray(group[name][i]) for name in layout.stored(view)}
        fp = np.asarray(group[f"{view}/fingerprint"][i]).tobytes()
        group[f"{view}/digest"][i] = np.frombuffer(record_digest(view, i, fp, stored), np.uint8)


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
