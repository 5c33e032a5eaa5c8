"""Hostile or broken dataset input ends in one line (exit code 2) in bounded time and memory: a label file of
a million rows, a YAML bomb, an image folder that is the filesystem root, a pipe named like an image, an image
file of gigabytes. Large files are sparse, so they cost no disk; nothing here may read them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_clean_error, make_dataset, run_cli
from softlabel import databounds
from softlabel.data import build_index, load_data_yaml
from softlabel.databounds import MAX_IMAGE_BYTES, MAX_LABEL_BYTES, MAX_LABEL_ROWS, check_image_file
from softlabel.errors import UserError
from softlabel.yamlfile import MAX_YAML_ALIASES, MAX_YAML_BYTES, MAX_YAML_DEPTH, read_mapping

DUMP = ["--imgsz", "64", "--batch", "4", "--shard-size", "4", "--views", "1", "--close-views", "1", "--quiet"]


def _dump(teacher, data_yaml, out):
    return run_cli("dump", "--teacher", teacher, "--data", data_yaml, "--out", out, *DUMP)


def _sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _rows(n: int, sep: str = "\n") -> str:
    return sep.join(f"0 {0.1 + i * 1e-4:.6f} 0.5 0.01 0.01" for i in range(n)) + sep


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: each level lists `width` aliases of the one below, so names stand for width**levels strings."""
    lines = ['l0: &l0 "lol"']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]")
    lines.append(f"names: [{', '.join([f'*l{levels - 1}'] * width)}]")
    return "\n".join(lines) + "\ntrain: images/train\nval: images/train\n"


# ---- label files -------------------------------------------------------------------------------------------


def test_label_file_with_too_many_rows_is_refused_by_dump(tmp_path, teacher):
    data_yaml = make_dataset(tmp_path / "ds")
    label = tmp_path / "ds" / "labels" / "train" / "img003.txt"
    label.write_text(_rows(MAX_LABEL_ROWS + 1))
    result = _dump(teacher, data_yaml, tmp_path / "out.zarr")
    assert_clean_error(result, label, f"{MAX_LABEL_ROWS + 1:,} label rows", f"{MAX_LABEL_ROWS:,}")
    assert not (tmp_path / "out.zarr").exists()


def test_label_rows_at_the_limit_pass_and_every_line_break_counts(tmp_path):
    data_yaml = make_dataset(tmp_path / "ds")
    label = tmp_path / "ds" / "labels" / "train" / "img003.txt"
    label.write_text(_rows(MAX_LABEL_ROWS) + "\n  \n")  # blank lines are no rows, as Ultralytics reads them
    index = build_index(load_data_yaml(data_yaml), warn=None)
    assert max(len(lab) for lab in index.labels) == MAX_LABEL_ROWS
    with open(label, "w", newline="") as f:
        f.write(_rows(MAX_LABEL_ROWS + 1, sep="\r"))  # str.splitlines(), which Ultralytics uses, splits at '\r' too
    with pytest.raises(UserError, match=f"img003.txt: {MAX_LABEL_ROWS + 1:,} label rows"):
        build_index(load_data_yaml(data_yaml), warn=None)


def test_huge_label_file_is_refused_before_it_is_read(tmp_path, teacher):
    data_yaml = make_dataset(tmp_path / "ds")
    label = _sparse(tmp_path / "ds" / "labels" / "train" / "img004.txt", 4 << 30)
    start = time.perf_counter()
    result = _dump(teacher, data_yaml, tmp_path / "out.zarr")
    assert time.perf_counter() - start < 60  # reading 4 GiB and splitting it into strings would take minutes
    assert_clean_error(result, label, "4.0 GiB (4,294,967,296 bytes)", f"({MAX_LABEL_BYTES:,}-byte) limit")


def test_label_path_that_is_not_a_regular_file_is_refused(tmp_path):
    data_yaml = make_dataset(tmp_path / "ds")
    label = tmp_path / "ds" / "labels" / "train" / "img005.txt"
    label.unlink()
    os.mkfifo(label)  # Ultralytics would take it for a missing label: the image would train as background
    with pytest.raises(UserError, match="img005.txt: label file is not a regular file"):
        build_index(load_data_yaml(data_yaml), warn=None)


# ---- YAML --------------------------------------------------------------------------------------------------


def test_yaml_bomb_in_data_yaml_is_refused_quickly(tmp_path, teacher):
    make_dataset(tmp_path)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"more than {MAX_YAML_ALIASES} YAML aliases"):
        load_data_yaml(bomb)
    assert time.perf_counter() - start < 2  # it took a minute and 3.6 GB when Ultralytics parsed it
    assert_clean_error(_dump(teacher, bomb, tmp_path / "out.zarr"), bomb, f"more than {MAX_YAML_ALIASES} YAML aliases")


def test_yaml_bombs_and_oversized_yaml_in_softlabel_configs(tmp_path):
    bomb = tmp_path / "distill.yaml"
    bomb.write_text(_bomb())
    start = time.perf_counter()
    with pytest.raises(UserError, match=f"distill.yaml: more than {MAX_YAML_ALIASES} YAML aliases"):
        read_mapping(bomb, "distillation config")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 500 + "]" * 500 + "\n")  # PyYAML composes recursively: RecursionError at this depth
    with pytest.raises(UserError, match=f"deep.yaml: YAML nested more than {MAX_YAML_DEPTH} levels"):
        read_mapping(deep, "augmentation config")
    assert time.perf_counter() - start < 5
    big = _sparse(tmp_path / "big.yaml", 1 << 30)
    with pytest.raises(UserError, match=f"big.yaml: augmentation config is 1,073,741,824 bytes, over the {MAX_YAML_BYTES:,}-byte"):
        read_mapping(big, "augmentation config")
    big_data = _sparse(tmp_path / "data.yaml", 1 << 30)
    with pytest.raises(UserError, match=f"data.yaml: data.yaml is 1,073,741,824 bytes, over the {MAX_YAML_BYTES:,}-byte"):
        load_data_yaml(big_data)
    shared = tmp_path / "shared.yaml"  # a few aliases, as a config reusing a block would have, still read
    shared.write_text("base: &w {weight: 1.0}\ncls: *w\nbox: *w\n")
    assert read_mapping(shared, "distillation config") == {"base": {"weight": 1.0}, "cls": {"weight": 1.0}, "box": {"weight": 1.0}}


# ---- image folders -----------------------------------------------------------------------------------------


def test_filesystem_root_as_image_folder_is_refused(tmp_path, teacher):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": "/", "train": ".", "val": ".", "names": ["square", "disc", "bar"]}))
    start = time.perf_counter()
    result = _dump(teacher, data_yaml, tmp_path / "out.zarr")
    assert time.perf_counter() - start < 60  # Ultralytics' glob would walk every file on the machine
    assert_clean_error(result, "the filesystem root (/)")


def test_folder_entry_limit_and_symlink_loops(tmp_path, monkeypatch):
    data_yaml = make_dataset(tmp_path / "ds")
    train = tmp_path / "ds" / "images" / "train"
    monkeypatch.setattr(databounds, "MAX_FOLDER_ENTRIES", 5)
    with pytest.raises(UserError, match=f"{train}: more than 5 files and folders"):
        build_index(load_data_yaml(data_yaml), warn=None)
    monkeypatch.undo()
    # Two links back to their folder: Ultralytics' glob lists 2**40 paths, until the OS's symlink limit.
    os.symlink(".", train / "again")
    os.symlink("..", train / "up")
    start = time.perf_counter()
    with pytest.raises(UserError, match="a folder symlink that leads back into its own folders"):
        build_index(load_data_yaml(data_yaml), warn=None)
    assert time.perf_counter() - start < 10


def test_pipe_named_like_an_image_is_refused_without_blocking(tmp_path, teacher):
    data_yaml = make_dataset(tmp_path / "ds")
    fifo = tmp_path / "ds" / "images" / "train" / "x.jpg"
    os.mkfifo(fifo)
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    argv = [sys.executable, "-m", "softlabel", "dump", "--teacher", str(teacher), "--data", str(data_yaml),
            "--out", str(tmp_path / "out.zarr"), *DUMP]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)  # opening the pipe would block forever
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and str(fifo) in lines[0] and "not a regular file" in lines[0], proc.stderr


def test_devices_and_folders_named_like_images(tmp_path):
    link = tmp_path / "zero.jpg"
    os.symlink("/dev/zero", link)  # endless bytes: the speed check would never finish reading it
    with pytest.raises(UserError, match="zero.jpg: listed as an image but not a regular file"):
        check_image_file(str(link))
    (tmp_path / "folder.jpg").mkdir()  # Ultralytics lists it, then skips it as no image; left to that rule
    check_image_file(str(tmp_path / "folder.jpg"))
    check_image_file(str(tmp_path / "missing.jpg"))  # likewise a dangling path


def test_huge_image_is_refused_before_it_is_read(tmp_path, teacher):
    data_yaml = make_dataset(tmp_path / "ds")
    big = _sparse(tmp_path / "ds" / "images" / "train" / "big.jpg", 4 << 30)
    start = time.perf_counter()
    result = _dump(teacher, data_yaml, tmp_path / "out.zarr")
    assert time.perf_counter() - start < 60
    assert_clean_error(result, big, "4.0 GiB (4,294,967,296 bytes)", f"({MAX_IMAGE_BYTES:,}-byte) limit")
    listed = tmp_path / "ds" / "train.txt"  # the same image named in a list file instead of found in a folder
    listed.write_text("./images/train/big.jpg\n./images/train/img001.png\n")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"path": str(tmp_path / "ds"), "train": "train.txt", "val": "train.txt",
                                                        "names": ["square", "disc", "bar"]}))
    with pytest.raises(UserError, match="big.jpg: image file of 4.0 GiB"):
        build_index(load_data_yaml(tmp_path / "list.yaml"), warn=None)
    _sparse(listed, 1 << 30)  # Ultralytics reads a list file whole too
    with pytest.raises(UserError, match="train.txt: image list of 1.0 GiB"):
        build_index(load_data_yaml(tmp_path / "list.yaml"), warn=None)


def test_normal_dataset_with_a_few_aliases_still_passes(tmp_path):
    data_yaml = make_dataset(tmp_path)
    raw = yaml.safe_load(data_yaml.read_text())
    data_yaml.write_text(f"path: {raw['path']}\ntrain: &split images/train\nval: *split\nnames: {raw['names']}\n")
    index = build_index(load_data_yaml(data_yaml), warn=None)
    assert len(index) == 12 and not index.skipped
