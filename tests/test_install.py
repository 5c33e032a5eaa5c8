"""A wheel of the package carries its configs and works outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_has_its_configs():
    # run by .ci/run against the installed package: the configs must have travelled with it
    from softlabel.builtin import CONFIG_DIR, builtin_names

    assert CONFIG_DIR.is_relative_to(Path(__import__("softlabel").__file__).parent)
    assert builtin_names("distill") == ["accurate", "default", "distances", "logits_only"]
    assert builtin_names("augment") == ["default"]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_works_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml names
    src = tmp_path / "src"
    shutil.copytree(ROOT / "softlabel", src / "softlabel", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    code = "from setuptools import build_meta as b; import sys; print(b.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    for kind, name in (("augment", "default"), ("distill", "default"), ("distill", "accurate"), ("distill", "logits_only")):
        assert f"softlabel/configs/{kind}/{name}.yaml" in names
    empty = tmp_path / "empty"
    empty.mkdir()
    check = (
        "import softlabel, sys; from softlabel.distill.config import load_distill; from softlabel.augment import load_augment\n"
        "assert softlabel.__file__.startswith(sys.argv[1]), softlabel.__file__\n"
        "print(sorted(load_distill('logits_only').terms), sorted(load_distill(None).terms), load_augment('default').mosaic)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path / "site")], cwd=empty, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["['box',", "'cls']", "['box',", "'cls',", "'feat']", "1.0"]
