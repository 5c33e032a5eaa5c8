"""The accuracy benchmark's curve reading (plain's flatness, the views study's fitting signal) and its
trees dataset (benchmarks/trees.py), the merge of results that ran a mode and seed each, and the ablation table."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ablations  # noqa: E402
import accuracy  # noqa: E402
import merge_seeds  # noqa: E402
import trees  # noqa: E402


def test_flatness_looks_at_the_last_fifth_of_the_epochs():
    rising = [0.01 * e for e in range(1, 21)]  # +0.04 over the last 4 epochs
    assert accuracy.flatness(rising) == {"last_epochs": 4, "gain": rising[-1] - rising[-5], "flattened": False}
    plateau = [min(0.3, 0.05 * e) + 0.001 * e for e in range(1, 21)]
    assert accuracy.flatness(plateau)["flattened"] and accuracy.flatness(plateau)["gain"] > 0
    assert accuracy.mean_curve([[0.1, 0.3, 0.5], [0.3, 0.5]]) == [0.2, 0.4]


def test_tail_mean_averages_the_last_epochs_of_each_seed():
    curve = [0.5] * 5 + [0.1 * i for i in range(accuracy.TAIL)]  # the early epochs are left out
    assert accuracy.tail_mean(curve) == pytest.approx(0.1 * (accuracy.TAIL - 1) / 2)
    tail = accuracy.summarise_tail([curve, [0.2] * 20])
    assert tail["map50_95_tail"] == pytest.approx([0.45, 0.2]) and tail["map50_95_tail_std"] == pytest.approx(0.25 / 2 ** 0.5)
    assert accuracy.summarise_tail([curve, []])["map50_95_tail_mean"] is None  # a run without a curve has no tail


def test_fit_signal_finds_where_val_stops_rising_while_the_distillation_loss_still_falls():
    val = [min(0.4, 0.05 * e) for e in range(1, 21)]  # flat from epoch 8
    falling_kd = [2.0 - 0.08 * e for e in range(20)]
    fit = accuracy.fit_signal(val, falling_kd, mosaic_epochs=20, views=4)
    assert 6 <= fit["fit_epoch"] <= 10 and fit["fit_replays"] == fit["fit_epoch"] / 4 and fit["kd_drop_after"] > 0.1
    # the loss flat too: the student stopped learning altogether, it did not fit the cache
    assert accuracy.fit_signal(val, [1.0] * 20, mosaic_epochs=20, views=4)["fit_epoch"] is None
    # still rising at the end of the mosaic epochs: no fitting either
    assert accuracy.fit_signal([0.02 * e for e in range(20)], falling_kd, mosaic_epochs=20, views=4)["fit_epoch"] is None
    # the closing epochs (other views) are left out
    assert accuracy.fit_signal(val, falling_kd, mosaic_epochs=5, views=4)["fit_epoch"] is None


def test_a_box_on_a_tile_edge_is_clipped_and_kept_only_when_enough_of_it_shows():
    boxes = np.array([[236.0, 10, 276, 50],  # half inside the tile at x 0..256: kept, clipped at 256
                      [246.0, 60, 286, 100],  # a quarter inside: dropped
                      [10.0, 10, 30, 30]])  # wholly inside: unchanged
    assert trees.tile_boxes(boxes, 0, 0, tile=256, min_visible=0.4).tolist() == [[236, 10, 256, 50], [10, 10, 30, 30]]
    # the next tile to the right sees the first two in its own frame: 0.5 and 0.75 of them inside
    assert trees.tile_boxes(boxes, 256, 0, tile=256, min_visible=0.4).tolist() == [[0, 10, 20, 50], [0, 60, 30, 100]]


def folder_bytes(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def tree_tiles(tmp_path_factory) -> tuple[Path, dict]:
    if importlib.util.find_spec("deepforest") is None:
        pytest.skip(f"deepforest's bundled images are not installed: {trees.INSTALL}")
    data_yaml, manifest, reused = trees.ensure_trees(tmp_path_factory.mktemp("trees") / "data")
    assert not reused
    return data_yaml.parent, manifest


def test_trees_split_by_source_image_with_the_documented_counts(tree_tiles):
    root, manifest = tree_tiles
    sources = {}
    for split in ("train", "val"):
        tiles = sorted((root / "images" / split).glob("*.png"))
        sources[split] = {t.stem.rsplit("_", 2)[0] for t in tiles}  # tile names: <source>_<y>_<x>
        lines = [ln for f in (root / "labels" / split).glob("*.txt") for ln in f.read_text().splitlines()]
        for ln in lines:
            cls, *xywh = ln.split()
            assert cls == "0" and len(xywh) == 4 and all(0 < float(v) <= 1 for v in xywh), ln
        assert {t.stem for t in (root / "labels" / split).glob("*.txt")} <= {t.stem for t in tiles}
        assert (len(tiles), len(lines)) == (manifest["splits"][split]["tiles"], manifest["splits"][split]["boxes"])
    assert not sources["train"] & sources["val"]
    assert sources == {split: {stem for stem, (s, _) in trees.SOURCES.items() if s == split} for split in ("train", "val")}
    # the counts the module's docstring and the trees preset state
    assert {split: (e["tiles"], e["boxes"]) for split, e in manifest["splits"].items()} == {"train": (74, 518), "val": (16, 244)}
    assert (root / "data.yaml").read_text() == "train: images/train\nval: images/val\nnames:\n  0: tree\n"


def test_trees_build_is_deterministic_and_reused_by_its_manifest(tree_tiles, tmp_path):
    root, _ = tree_tiles
    before = folder_bytes(root)
    _, _, reused = trees.ensure_trees(root)
    assert reused and folder_bytes(root) == before
    # a build elsewhere writes the same bytes
    trees.build_trees(tmp_path / "again")
    assert folder_bytes(tmp_path / "again") == before
    # other settings rebuild: at most 8 train tiles, spread over the sources in order
    _, small, reused = trees.ensure_trees(tmp_path / "again", max_train=8, max_val=4)
    assert not reused and (small["splits"]["train"]["tiles"], small["splits"]["val"]["tiles"]) == (8, 4)
    assert len(list((tmp_path / "again" / "images" / "train").glob("*.png"))) == 8


def _seed_result(path: Path, mode: str, seed: int, value: float, teacher: str) -> Path:
    import json

    settings = {k: 1 for k in merge_seeds.SAME_SETTINGS} | {"student": "yolov8n"}
    modes = {mode: {"seeds": [seed], "map50_95": [value], "map50": [2 * value], "seconds": [10.0], "runs": [f"{mode}-s{seed}"]}}
    path.write_text(json.dumps({"preset": "trees", "regime": "scratch", "epochs": 100, "settings": settings, "dataset": "d",
                                "teacher": {"weights": teacher}, "modes": modes, "curves": {mode: {str(seed): [value]}}}))
    return path


def test_merge_gathers_each_mode_from_the_runs_of_that_mode(tmp_path):
    """One process per mode and seed: each mode's mean and sample spread are over its own seeds, and a plain run
    may name another teacher (it reads none), while two distilling runs of different teachers are refused."""
    import statistics

    plain = [_seed_result(tmp_path / f"p{s}.json", "plain", s, v, "old.pt") for s, v in ((0, 0.10), (1, 0.12), (2, 0.11))]
    offline = [_seed_result(tmp_path / f"o{s}.json", "offline", s, v, "new.pt") for s, v in ((0, 0.15), (1, 0.13), (2, 0.17))]
    merged = merge_seeds.merge(plain + offline)
    assert merged["modes"]["plain"]["seeds"] == [0, 1, 2] and merged["modes"]["offline"]["seeds"] == [0, 1, 2]
    assert merged["modes"]["offline"]["map50_95_mean"] == pytest.approx(0.15)
    assert merged["modes"]["plain"]["map50_95_std"] == pytest.approx(statistics.stdev([0.10, 0.12, 0.11]))
    assert merged["teacher"]["weights"] == "new.pt" and merged["curves"]["offline"] == {"0": [0.15], "1": [0.13], "2": [0.17]}
    assert merged["modes"]["plain"]["map50_95_tail"] == pytest.approx([0.10, 0.12, 0.11])  # each seed's own curve
    other = _seed_result(tmp_path / "o3.json", "offline", 3, 0.2, "other.pt")
    with pytest.raises(SystemExit, match="another teacher"):
        merge_seeds.merge(offline + [other])
    with pytest.raises(SystemExit, match="more than one input"):
        merge_seeds.merge(offline + [_seed_result(tmp_path / "again.json", "offline", 1, 0.2, "new.pt")])


def test_ablation_rows_are_paired_with_the_default_run_of_the_same_seed(tmp_path):
    """Each ablation seed is set against the default offline run of that seed, whatever order the files come in;
    an ablation seed with no default run, or another teacher, is refused."""
    import json

    base = {"preset": "trees", "epochs": 100, "settings": {"student": "yolov8n"},
            "teacher": {"weights": "t.pt", "model": "yolov8s", "map50_95": 0.2},
            "modes": {"offline": {"seeds": [0, 1, 2], "map50_95": [0.10, 0.20, 0.30], "map50_95_mean": 0.2, "map50_95_std": 0.1,
                                  "map50_mean": 0.4, "map50_std": 0.2,
                                  "map50_95_tail": [0.10, 0.20, 0.30], "map50_95_tail_mean": 0.2, "map50_95_tail_std": 0.1}}}
    table = tmp_path / "accuracy-trees.json"
    table.write_text(json.dumps(base))
    runs = [_seed_result(tmp_path / f"accuracy-trees-ablation-wide-seed{s}.json", "offline", s, v, "t.pt")
            for s, v in ((2, 0.33), (0, 0.14), (1, 0.20))]
    runs.append(_seed_result(tmp_path / "accuracy-trees-ablation-off-seed0.json", "offline", 0, 0.05, "t.pt"))
    result = ablations.build(table, runs)
    wide, off = result["ablations"]
    assert (wide["name"], wide["seeds"], off["name"]) == ("wide", [2, 0, 1], "off")
    assert wide["map50_95_vs_default"] == pytest.approx([0.03, 0.04, 0.0])
    assert wide["map50_95_vs_default_mean"] == pytest.approx(0.07 / 3)
    assert wide["map50_95_tail_vs_default"] == pytest.approx([0.03, 0.04, 0.0])  # each curve here is its one value
    assert off["map50_95_vs_default"] == pytest.approx([-0.05]) and off["map50_95_vs_default_std"] == 0.0
    assert "wide" in ablations.render(result, tmp_path / "out.json")
    stray = _seed_result(tmp_path / "accuracy-trees-ablation-more-seed7.json", "offline", 7, 0.1, "t.pt")
    with pytest.raises(SystemExit, match=r"seeds \[7\] have no default"):
        ablations.build(table, [stray])
    other = _seed_result(tmp_path / "accuracy-trees-ablation-else-seed0.json", "offline", 0, 0.1, "u.pt")
    with pytest.raises(SystemExit, match="not the table's"):
        ablations.build(table, [other])
