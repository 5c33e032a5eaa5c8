"""Ultralytics' training arguments in key=value form on `softlabel train`."""

from __future__ import annotations

import pytest
import yaml
from conftest import assert_clean_error, run_cli

from softlabel.errors import UserError
from softlabel.trainargs import merge_options, parse_train_args


def test_values_are_typed_and_checked_by_ultralytics():
    args = parse_train_args(["lr0=0.005", "optimizer=AdamW", "cos_lr=True", "nbs=8", "freeze=3", "amp=False", "cache=ram"])
    assert args == {"lr0": 0.005, "optimizer": "AdamW", "cos_lr": True, "nbs": 8, "freeze": 3, "amp": False, "cache": "ram"}
    with pytest.raises(UserError, match="'lr' is not a valid YOLO argument.*lr0"):
        parse_train_args(["lr=0.1"])
    with pytest.raises(UserError, match="'lr0=abc' is of invalid type"):
        parse_train_args(["lr0=abc"])
    with pytest.raises(UserError, match="key=value"):
        parse_train_args(["lr0"])


def test_options_given_both_ways_are_refused():
    options = {"epochs": 100, "batch": 16}
    assert merge_options(options, set(), {"epochs": 3, "lr0": 0.1}) == ({"epochs": 3, "batch": 16}, {"lr0": 0.1})
    with pytest.raises(UserError, match="'epochs' is given twice"):
        merge_options(options, {"epochs"}, {"epochs": 3})


@pytest.mark.parametrize("pair, needles", [
    ("lr=0.1", ["'lr' is not a valid YOLO argument", "lr0"]),
    ("rect=True", ["rect=True", "re-sort"]),
    ("multi_scale=0.5", ["multi_scale", "resizes whole batches"]),
    ("mosaic=0.5", ["mosaic=0.5", "augmentation comes from the cache"]),
    ("hsv_h=0.1", ["hsv_h", "augmentation comes from the cache"]),
    ("fraction=0.5", ["fraction", "images or classes the cache was dumped for"]),
])
def test_cli_refuses_with_one_line(tmp_path, pair, needles):
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", tmp_path / "absent.zarr", pair)
    assert_clean_error(r, *needles)


def test_cli_twice_and_missing_data(tmp_path):
    assert_clean_error(run_cli("train", "--student", "yolov8n.yaml", "--cache", tmp_path / "c.zarr", "--epochs", 2, "epochs=3"),
                       "'epochs' is given twice")
    assert_clean_error(run_cli("train", "--student", "yolov8n.yaml", "--teacher", tmp_path / "t.pt"), "--data is needed")


def test_arguments_reach_the_trainer_and_data_comes_from_the_cache(tmp_path, dataset, teacher):
    out = tmp_path / "c.zarr"
    r = run_cli("dump", "--teacher", teacher, "--data", dataset, "--out", out, "--imgsz", 64, "--batch", 4, "--views", 1, "--quiet")
    assert r.exit_code == 0, r.output
    r = run_cli("train", "--student", "yolov8n.yaml", "--cache", out, "--batch", 4, "--device", "cpu", "--distill", "logits_only",
                "epochs=1", "close_mosaic=0", "lr0=0.0123", "optimizer=AdamW", "cos_lr=True", "nbs=4", "warmup_epochs=0",
                f"project={tmp_path / 'runs'}", "name=kv")
    assert r.exit_code == 0, (r.output[-3000:], r.exception)
    args = yaml.safe_load((tmp_path / "runs" / "kv" / "args.yaml").read_text())
    assert (args["lr0"], args["optimizer"], args["cos_lr"], args["nbs"], args["epochs"], args["close_mosaic"]) == (
        0.0123, "AdamW", True, 4, 1, 0)
    assert args["data"] == str(dataset)
