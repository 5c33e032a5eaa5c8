"""`softlabel demo`: the digits scenes, a whole quick run, and reuse of what the first run built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from softlabel.cli import main
from softlabel.demo import QUICK_NOTICE
from softlabel.digits import DigitsSettings, build_digits, digit_count, ensure_digits, load_glyphs, split_glyphs
from softlabel.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels(root: Path) -> list[np.ndarray]:
    return [np.loadtxt(p, ndmin=2) for p in sorted((root / "labels" / "train").glob("*.txt"))]


def test_digit_scenes_are_deterministic_labelled_and_split_by_digit_image(tmp_path):
    settings = DigitsSettings(n_train=12, n_val=4, canvas=96, min_digit=12, max_digit=36, seed=3)
    a = build_digits(tmp_path / "a", settings).parent
    b = build_digits(tmp_path / "b", settings).parent
    for rel in ("images/train/train00005.png", "images/val/val00002.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    labels = _labels(a)
    assert sum(len(lab) for lab in labels) >= 12  # several digits per scene
    rows = np.concatenate(labels)
    assert set(rows[:, 0].astype(int)) <= set(range(10))
    assert (rows[:, 1:] > 0).all() and (rows[:, 1:] <= 1).all()
    x0, x1 = rows[:, 1] - rows[:, 3] / 2, rows[:, 1] + rows[:, 3] / 2
    assert (x0 >= -1e-6).all() and (x1 <= 1 + 1e-6).all()
    train, val = split_glyphs(len(load_glyphs()[0]), 0.25, 3)
    assert not set(train) & set(val) and len(train) + len(val) == 1797

    _, reused = ensure_digits(tmp_path / "a", settings)
    assert reused
    _, reused = ensure_digits(tmp_path / "a", DigitsSettings(n_train=13, n_val=4, canvas=96, min_digit=12, max_digit=36, seed=3))
    assert not reused and len(list((tmp_path / "a" / "images" / "train").iterdir())) == 13


def test_coco_like_digit_counts_have_the_asked_mean_and_a_long_tail():
    crowded = DigitsSettings(mean_digits=7, max_digits=80)
    rng = np.random.default_rng(0)
    counts = np.array([digit_count(rng, crowded) for _ in range(20_000)])
    assert abs(counts.mean() - 7) < 0.25 and np.median(counts) < 7  # skewed: most scenes hold few objects
    assert counts.min() == 1 and counts.max() <= 80 and (counts >= 30).mean() > 0.005
    uniform = np.array([digit_count(rng, DigitsSettings()) for _ in range(2_000)])
    assert uniform.min() == 1 and uniform.max() == 6
    # folders drawn before the setting existed keep their manifest, so they are reused rather than rebuilt
    assert "mean_digits" not in DigitsSettings().to_dict() and crowded.to_dict()["mean_digits"] == 7
    with pytest.raises(UserError, match="mean_digits"):
        build_digits("/nonexistent/never-written", DigitsSettings(mean_digits=9, max_digits=6))


def test_hued_digit_scenes_make_ten_classes_per_ink_and_the_ink_names_the_class(tmp_path):
    import cv2

    settings = DigitsSettings(n_train=24, n_val=4, canvas=160, min_digit=24, max_digit=64, inks=8)
    yaml_path = build_digits(tmp_path / "hued", settings)
    names = yaml.safe_load(yaml_path.read_text())["names"]
    assert len(names) == 80 and names[0] == "0-red" and names[79] == "9-rose"
    seen, checked = set(), 0
    for label_file in sorted((tmp_path / "hued" / "labels" / "train").iterdir()):
        img = cv2.imread(str(tmp_path / "hued" / "images" / "train" / f"{label_file.stem}.png"))
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
        H, W = img.shape[:2]
        for c, x, y, w, h in np.loadtxt(label_file, ndmin=2):
            cls = int(c)
            seen.add(cls)
            x0, y0, x1, y1 = (int(round(v)) for v in ((x - w / 2) * W, (y - h / 2) * H, (x + w / 2) * W, (y + h / 2) * H))
            patch = hsv[y0:y1, x0:x1].reshape(-1, 3)
            ink = patch[patch[:, 1] > 150]  # saturated pixels: the ink, not the greyish background
            if len(ink) < 20:
                continue
            # the hue the most ink votes for, each pixel weighted by saturation x value (dark background
            # pixels are often saturated but never bright), in bins centred on the eight ink hues
            nearest = np.round(ink[:, 0] * 2.0 / 45.0).astype(int) % 8
            votes = np.bincount(nearest, weights=ink[:, 1] * ink[:, 2], minlength=8)
            assert votes.argmax() == cls // 10, f"{label_file.name}: class {names[cls]} inked at hue {45 * votes.argmax()}"
            checked += 1
    assert checked >= 40 and len(seen) > 30 and max(seen) < 80
    with pytest.raises(UserError, match="inks"):
        build_digits(tmp_path / "bad", DigitsSettings(inks=9))
    assert "inks" not in DigitsSettings().to_dict()  # folders drawn before the setting existed are reused


def test_digit_scenes_of_a_class_subset_hold_only_those_digits_relabelled(tmp_path):
    import yaml

    settings = DigitsSettings(n_train=30, n_val=6, canvas=96, min_digit=12, max_digit=36, classes=(5, 6, 7, 8, 9))
    root = build_digits(tmp_path / "t", settings).parent
    assert yaml.safe_load((root / "data.yaml").read_text())["names"] == {0: "5", 1: "6", 2: "7", 3: "8", 4: "9"}
    found = set(np.concatenate(_labels(root))[:, 0].astype(int))
    assert found <= set(range(5)) and len(found) >= 3
    assert "classes" not in DigitsSettings().to_dict() and settings.to_dict()["classes"] == [5, 6, 7, 8, 9]
    with pytest.raises(UserError, match="classes"):
        build_digits(tmp_path / "bad", DigitsSettings(classes=(1, 1)))
    with pytest.raises(UserError, match="classes"):
        build_digits(tmp_path / "bad", DigitsSettings(classes=(3, 10)))


def test_recipe_nbs_defaults_to_the_batch_and_stays_out_of_old_manifests(tmp_path):
    from softlabel.demo import Recipe

    old, ultra = Recipe(imgsz=64, batch=8), Recipe(imgsz=64, batch=8, nbs=64)
    assert old.train_args(3, 0, tmp_path, "x")["nbs"] == 8 and ultra.train_args(3, 0, tmp_path, "x")["nbs"] == 64
    assert "nbs" not in old.identity() and ultra.identity()["nbs"] == 64 and "device" not in ultra.identity()


def test_bad_demo_input_is_one_line_and_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--quick", "--imgsz", "100", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "multiple of 32" in r.output
    r = CliRunner().invoke(main, ["demo", "--quick", "--teacher", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.slow
def test_quick_demo_runs_then_reuses_dataset_teacher_and_cache(tmp_path):
    out = tmp_path / "demo"
    first = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert QUICK_NOTICE in first.output and "mAP50-95" in first.output
    assert f"run directory: {out}" in first.output
    result = json.loads((out / "results.json").read_text())
    assert set(result["students"]) == {"distilled", "plain"}
    assert [r["role"] for r in result["rows"]] == ["teacher", "distilled", "plain"]
    for row in result["rows"]:
        assert row["params"] > 0 and row["latency_ms"] > 0 and 0 <= row["map50_95"] <= row["map50"] <= 1
    plot = Path(result["plot"])
    assert plot.is_file() and plot.read_bytes()[:8] == PNG_MAGIC
    teacher = Path(result["teacher"]["weights"])
    teacher_mtime = teacher.stat().st_mtime_ns
    data_mtime = (out / "data" / "images" / "train" / "train00000.png").stat().st_mtime_ns

    second = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert second.exit_code == 0, second.output
    for what in ("dataset: reused", "teacher: reused", "cache: reused"):
        assert what in second.output
    assert teacher.stat().st_mtime_ns == teacher_mtime
    assert (out / "data" / "images" / "train" / "train00000.png").stat().st_mtime_ns == data_mtime
    again = json.loads((out / "results.json").read_text())
    assert again["made"] == {"dataset": "reused", "teacher": "reused", "cache": "reused"}
    assert result["made"] == {"dataset": "built", "teacher": "trained", "cache": "written"}
    assert again["wall_seconds"] < result["wall_seconds"]
    assert again["teacher"]["map50_95"] == pytest.approx(result["teacher"]["map50_95"])


def test_a_model_trained_on_from_a_checkpoint_is_retrained_when_that_checkpoint_changes(tmp_path, monkeypatch):
    import softlabel.train
    from softlabel.demo import Recipe, ensure_teacher

    starts: list[str] = []

    class FakeYolo:
        def train(self, project: str, name: str, **_):
            (Path(project) / name / "weights").mkdir(parents=True, exist_ok=True)
            (Path(project) / name / "weights" / "best.pt").write_bytes(b"trained")

    def fake_resolve(model: str) -> FakeYolo:
        starts.append(model)
        return FakeYolo()

    monkeypatch.setattr(softlabel.train, "resolve_student", fake_resolve)
    pretrained = tmp_path / "pretrained.pt"
    pretrained.write_bytes(b"first pretraining")
    args = (tmp_path / "teacher", str(pretrained), 2, Recipe(imgsz=64, batch=8), 0, tmp_path / "data.yaml", {"id": 1})
    ensure_teacher(*args, echo=lambda _: None)
    ensure_teacher(*args, echo=lambda _: None)
    assert starts == [str(pretrained)]  # same start, same settings: reused
    pretrained.write_bytes(b"second pretraining")  # same path, other weights
    ensure_teacher(*args, echo=lambda _: None)
    assert starts == [str(pretrained)] * 2
