"""Contract 6: for every layout, softlabel's images and labels are those of Ultralytics' own YOLODataset."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from softlabel.data import build_index, load_data_yaml
from softlabel.errors import UserError


def _image(path: Path, seed: int, suffix: str = ".jpg") -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 255, (40 + seed % 7, 50, 3), dtype=np.uint8))
    return path


def _label(path: Path, *rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{r}\n" for r in rows))
    return path


def _yaml(file: Path, **data) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def ultralytics_train_set(data_yaml: Path) -> tuple[dict, list[str], list[np.ndarray]]:
    """What `yolo train` trains on: Ultralytics resolves the yaml and builds its own training dataset."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    dataset = build_yolo_dataset(get_cfg(overrides={"imgsz": 64}), data["train"], 4, data, mode="train")
    labels = [np.concatenate([lb["cls"], lb["bboxes"]], 1).astype(np.float32) for lb in dataset.labels]
    return data, list(dataset.im_files), labels


def assert_same_as_ultralytics(data_yaml: Path):
    data, files, labels = ultralytics_train_set(data_yaml)
    spec = load_data_yaml(data_yaml)
    index = build_index(spec, "train", warn=None)
    assert [str(p) for p in index.images] == files
    assert len(index.labels) == len(labels)
    for mine, theirs in zip(index.labels, labels):
        np.testing.assert_array_equal(mine, theirs)
    assert list(spec.names) == [data["names"][k] for k in sorted(data["names"])]
    return index


def test_roboflow_export_with_bad_files_hidden_files_and_duplicates(tmp_path):
    """Roboflow's layout (`../train/images` beside data.yaml), a truncated JPEG, a notebook checkpoint
    folder, a macOS resource fork and duplicate label rows."""
    root = tmp_path / "export"
    for i in range(5):
        image = _image(root / "train" / "images" / f"im{i}", i)
        _label(root / "train" / "labels" / f"im{i}.txt", f"{i % 2} 0.5 0.5 0.25 0.5")
    _label(root / "train" / "labels" / "im3.txt", "1 0.5 0.5 0.25 0.5", "1 0.5 0.5 0.25 0.5", "0 0.2 0.2 0.1 0.1")
    image = root / "train" / "images" / "im4.jpg"
    image.write_bytes(image.read_bytes()[:300])
    hidden = root / "train" / "images" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "im0-checkpoint.jpg").write_bytes((root / "train" / "images" / "im0.jpg").read_bytes())
    (root / "train" / "images" / "._im1.jpg").write_bytes(b"\x00\x05\x16\x07 not an image")
    _image(root / "valid" / "images" / "v0", 9)
    data_yaml = _yaml(root / "data.yaml", train="../train/images", val="../valid/images", nc=2, names=["cat", "dog"])

    index = assert_same_as_ultralytics(data_yaml)
    assert index.relative_paths() == [f"train/images/im{i}.jpg" for i in range(4)]
    assert index.skipped_names() == ["train/images/im4.jpg"]
    assert len(index.labels[3]) == 2  # the repeated row is gone
    with pytest.raises(UserError, match=r"--strict.*train/images/im4\.jpg"):
        build_index(load_data_yaml(data_yaml), strict=True, warn=None)


def test_relative_path_key_is_taken_from_the_working_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    for i in range(3):
        _image(work / "ds" / "images" / "train" / f"a{i}", i, ".png")
        _label(work / "ds" / "labels" / "train" / f"a{i}.txt", "0 0.4 0.4 0.2 0.2")
    data_yaml = _yaml(work / "cfg" / "data.yaml", path="ds", train="images/train", val="images/train", names={0: "a"})
    monkeypatch.chdir(work)
    index = assert_same_as_ultralytics(data_yaml)
    assert index.root == (work / "ds").resolve() and len(index) == 3


def test_nc_without_names(tmp_path):
    for i in range(2):
        _image(tmp_path / "images" / "train" / f"n{i}", i)
        _label(tmp_path / "labels" / "train" / f"n{i}.txt", "2 0.5 0.5 0.3 0.3")
    data_yaml = _yaml(tmp_path / "data.yaml", path=str(tmp_path), train="images/train", val="images/train", nc=3)
    assert_same_as_ultralytics(data_yaml)
    assert load_data_yaml(data_yaml).names == ("class_0", "class_1", "class_2")


def test_symlinked_image_folder_keeps_its_labels(tmp_path):
    pool = tmp_path / "pool"
    for i in range(3):
        _image(pool / f"s{i}", i)
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    os.symlink(pool, root / "images" / "train" / "batch1")
    os.symlink(pool / "s0.jpg", root / "images" / "train" / "single.jpg")
    for i in range(3):
        _label(root / "labels" / "train" / "batch1" / f"s{i}.txt", f"{i} 0.5 0.5 0.2 0.2")
    _label(root / "labels" / "train" / "single.txt", "1 0.3 0.3 0.2 0.2")
    data_yaml = _yaml(root / "data.yaml", path=str(root), train="images/train", val="images/train", names=["a", "b", "c"])
    index = assert_same_as_ultralytics(data_yaml)
    assert index.relative_paths() == [f"images/train/batch1/s{i}.jpg" for i in range(3)] + ["images/train/single.jpg"]
    assert all(len(lab) == 1 for lab in index.labels)


def test_polygons_boxes_and_mixed_label_files(tmp_path):
    root = tmp_path / "ds"
    for i in range(4):
        _image(root / "images" / "train" / f"p{i}", i)
    _label(root / "labels" / "train" / "p0.txt", "0 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6")  # a polygon
    _label(root / "labels" / "train" / "p1.txt", "1 0.5 0.5 0.2 0.2")  # a box
    _label(root / "labels" / "train" / "p2.txt", "0 0.1 0.1 0.5 0.1 0.5 0.6", "1 0.5 0.5 0.2 0.2")  # both: skipped
    _label(root / "labels" / "train" / "p3.txt", "1 0.5 0.5 0.2")  # too few columns: skipped
    data_yaml = _yaml(root / "data.yaml", path=str(root), train="images/train", val="images/train", names=["a", "b"])
    index = assert_same_as_ultralytics(data_yaml)
    assert index.relative_paths() == ["images/train/p0.jpg", "images/train/p1.jpg"]
    assert sorted(index.skipped_names()) == ["images/train/p2.jpg", "images/train/p3.jpg"]
    np.testing.assert_allclose(index.labels[0], [[0, 0.3, 0.35, 0.4, 0.5]], atol=1e-6)


def test_image_list_file_and_stable_hash(tmp_path):
    root = tmp_path / "ds"
    for i in (2, 0, 1):
        _image(root / "images" / "train" / f"t{i}", i)
        _label(root / "labels" / "train" / f"t{i}.txt", f"0 0.5 0.5 0.{i + 1} 0.2")
    (root / "train.txt").write_text("".join(f"./images/train/t{i}.jpg\n" for i in (2, 0, 1)))
    data_yaml = _yaml(root / "data.yaml", path=str(root), train="train.txt", val="train.txt", names=["a"])
    index = assert_same_as_ultralytics(data_yaml)
    assert index.relative_paths() == [f"images/train/t{i}.jpg" for i in range(3)]
    again = build_index(load_data_yaml(data_yaml), warn=None)
    assert again.list_hash() == index.list_hash()
    _label(root / "labels" / "train" / "t1.txt", "0 0.5 0.5 0.9 0.2")
    assert build_index(load_data_yaml(data_yaml), warn=None).list_hash() != index.list_hash()


def test_bad_data_yaml_is_one_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    missing = _yaml(tmp_path / "a.yaml", train="images", val="images")
    with pytest.raises(UserError, match="'names' or 'nc'"):
        load_data_yaml(missing)
    with pytest.raises(UserError, match="not found"):
        load_data_yaml(tmp_path / "nothing.yaml")
    mismatch = _yaml(tmp_path / "b.yaml", train="images", val="images", nc=3, names=["a"])
    with pytest.raises(UserError, match="must match") as e:
        load_data_yaml(mismatch)
    assert "\n" not in str(e.value)
