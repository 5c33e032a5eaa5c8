"""Phase one end to end: dump, self-description, resume (contracts 4 and 5), and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import NAMES, assert_clean_error, make_dataset, run_cli
from softlabel.cache import store
from softlabel.cache.reader import CacheReader
from softlabel.data import build_index, load_data_yaml
from softlabel.errors import UserError
from softlabel.augment import load_augment
from softlabel.replay import Replay, View
from softlabel.teacher import Teacher, to_model_input

# A dense float16 store: the exactness contracts compare it with the live teacher at tight
# tolerances. The default (int8, sparse head) is tested in test_storage.
ARGS = ["--imgsz", "64", "--batch", "4", "--shard-size", "4", "--views", "2", "--quiet", "--precision", "float16", "--head-topk", "0", "--features", "dense"]



def dump_args(teacher, data, out, *extra):
    return ["dump", "--teacher", teacher, "--data", data, "--out", out, *ARGS, *extra]


def arrays_of(location) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(location), mode="r")
    out = {}

    def walk(g, prefix=""):
        for name, arr in g.arrays():
            out[prefix + name] = np.asarray(arr[:])
        for name, sub in g.groups():
            walk(sub, f"{prefix}{name}/")

    walk(group)
    return out


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, dataset, teacher):
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    result = run_cli(*dump_args(teacher, dataset, out))
    assert result.exit_code == 0, result.output + str(result.exception)
    return out


def test_dump_writes_every_view_and_describes_itself(dumped, dataset, teacher):
    result = run_cli("info", dumped, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    for key in ("schema_version", "teacher", "data", "augment", "storage", "views", "complete", "bytes_total", "bytes_per_sample_view"):
        assert key in info
    assert info["complete"] is True
    assert set(info["views"]) == {"v0", "v1", "c0"}
    t = info["teacher"]
    assert t["nc"] == 3 and t["strides"] == [8, 16, 32] and t["reg_max"] == 16
    assert t["feature_channels"] == [64, 128, 256] and t["names"] == ["square", "disc", "bar"]
    assert len(t["sha256"]) == 64
    assert info["data"]["count"] == 12 and info["data"]["images_hash"]
    assert info["augment"]["imgsz"] == 64 and info["augment"]["views"] == 2 and info["augment"]["mosaic"] == 1.0 and info["augment"]["mosaic_group"] == 64
    assert info["storage"]["dtype"] == "float16" and info["storage"]["checksum"] == "crc32c"
    assert info["bytes_total"] > 0 and info["bytes_per_sample_view"]["head/p3"] > 0
    human = run_cli("info", dumped)
    assert "complete   yes" in human.stdout and "head/p3" in human.stdout


def test_cached_tensors_equal_teacher_on_replayed_input(dumped, dataset, teacher):
    reader = CacheReader(str(dumped))
    replay = Replay(build_index(load_data_yaml(dataset)), load_augment(), 64, seed=0)
    t = Teacher.load(teacher)
    for view, i in [(View("v", 0), 0), (View("v", 1), 5), (View("c", 0), 11)]:
        sample = replay(i, view)
        cached = reader.read(view.key, i)
        assert cached.fingerprint == sample.fingerprint
        out = t(to_model_input(torch.from_numpy(sample.image[None]), t.device))
        live_head = torch.cat([h[0].flatten(1) for h in out.head], 1)  # [C, A], levels in anchor order
        np.testing.assert_allclose(cached.head.astype(np.float32), live_head.numpy(), rtol=2e-3, atol=2e-3)
        for lvl, live in zip(reader.levels, out.feat):
            np.testing.assert_allclose(cached.feat[lvl].astype(np.float32), live[0].numpy(), rtol=2e-3, atol=2e-3)


def test_rerun_resumes_nothing_and_other_settings_are_refused(dumped, dataset, teacher):
    before = arrays_of(dumped)
    again = run_cli(*dump_args(teacher, dataset, dumped))
    assert again.exit_code == 0 and "0 sample-views written" in again.stdout
    refused = run_cli(*dump_args(teacher, dataset, dumped, "--seed", "5", "--no-features"))
    assert refused.exit_code == 2
    assert "augment.seed: 0 -> 5" in refused.stderr and "storage.features: True -> False" in refused.stderr
    after = arrays_of(dumped)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_levels_and_no_features(tmp_path, dataset, teacher):
    out = tmp_path / "p45.zarr"
    assert run_cli(*dump_args(teacher, dataset, out, "--levels", "p4,p5", "--views", "1", "--close-views", "0")).exit_code == 0
    group = zarr.open_group(str(out), mode="r")
    assert "v0/feat/p4" in group and "v0/feat/p5" in group and "v0/feat/p3" not in group and "c0" not in group
    out2 = tmp_path / "nofeat.zarr"
    assert run_cli(*dump_args(teacher, dataset, out2, "--no-features", "--views", "1")).exit_code == 0
    assert "v0/feat" not in zarr.open_group(str(out2), mode="r")
    bad = run_cli(*dump_args(teacher, dataset, tmp_path / "x.zarr", "--levels", "p6"))
    assert bad.exit_code == 2 and "p6" in bad.stderr


def test_overwrite_starts_over(tmp_path, dataset, teacher):
    out = tmp_path / "o.zarr"
    assert run_cli(*dump_args(teacher, dataset, out, "--views", "1")).exit_code == 0
    again = run_cli(*dump_args(teacher, dataset, out, "--views", "1", "--seed", "3", "--overwrite"))
    assert again.exit_code == 0
    assert store.read_attrs(str(out))["augment"]["seed"] == 3


def _done_shards(out: Path) -> int:
    try:
        group = zarr.open_group(str(out), mode="r")
        return sum(int(np.asarray(group[f"{v}/done"][:]).sum()) for v in ("v0", "v1", "c0") if f"{v}/done" in group)
    except Exception:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, dataset, teacher, dumped):
    out, reference = tmp_path / "killed.zarr", tmp_path / "ref.zarr"

    def command(store: Path) -> list[str]:
        return [sys.executable, "-m", "softlabel", *dump_args(teacher, dataset, store, "--shard-size", "2", "--batch", "2")]

    cmd = command(out)
    # the reference runs as a fresh process too: torch's CPU thread count changes float32 results in the
    # last bits, and tests that train in this process leave it changed (Ultralytics' trainer sets it)
    ref = subprocess.run(command(reference), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    rng = np.random.default_rng(int(time.time()))
    kills = 0
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        target = _done_shards(out) + 1 + attempt
        while _done_shards(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.3)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the dump finished before it could be killed"
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = arrays_of(out), arrays_of(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# bad input: exit code 2, one line naming the culprit, no traceback, the store untouched ---------------------


@pytest.fixture
def existing_store(tmp_path, dumped):
    import shutil

    out = tmp_path / "keep.zarr"
    shutil.copytree(dumped, out)
    return out


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_missing_and_malformed_data_yaml(tmp_path, teacher, existing_store):
    before = _snapshot(existing_store)
    missing = tmp_path / "nope.yaml"
    assert_clean_error(run_cli(*dump_args(teacher, missing, existing_store)), missing, "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert_clean_error(run_cli(*dump_args(teacher, bad, existing_store)), bad, "YAML")
    no_names = tmp_path / "nonames.yaml"
    no_names.write_text("train: images\n")
    assert_clean_error(run_cli(*dump_args(teacher, no_names, existing_store)), no_names, "names")
    assert _snapshot(existing_store) == before


def test_teacher_missing_not_a_checkpoint_or_not_detection(tmp_path, dataset, existing_store):
    before = _snapshot(existing_store)
    missing = tmp_path / "missing.pt"
    assert_clean_error(run_cli(*dump_args(missing, dataset, existing_store)), missing, "not found")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert_clean_error(run_cli(*dump_args(junk, dataset, existing_store)), junk, "not an Ultralytics checkpoint")
    from ultralytics.nn.tasks import ClassificationModel, SegmentationModel

    for cls, cfg, word in ((SegmentationModel, "yolov8n-seg.yaml", "segment"), (ClassificationModel, "yolov8n-cls.yaml", "classify")):
        path = tmp_path / f"{word}.pt"
        torch.save({"model": cls(cfg, nc=3, verbose=False).half(), "train_args": {}}, path)
        assert_clean_error(run_cli(*dump_args(path, dataset, existing_store)), path, word, "supported")
    assert _snapshot(existing_store) == before


@pytest.mark.parametrize("branch", [None, "one2one", "mean"])
def test_end_to_end_teacher_keeps_the_branch_asked_for(tmp_path, dataset, branch):
    """A YOLO26 teacher (end-to-end, reg_max 1): the store records its branches and the one it keeps, whose class
    logits it holds (verify compares them with the live teacher's); 4 distances per anchor, not DFL bins."""
    from ultralytics.nn.tasks import DetectionModel

    from softlabel.cache.reader import CacheReader
    from softlabel.teacher import Teacher

    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(NAMES[:3]))
    with torch.no_grad():  # a fresh head's branches are copies of each other: make them differ
        for seq in model.model[-1].one2one_cv3:
            seq[-1].bias += 2.0
    path = tmp_path / "e2e.pt"
    torch.save({"model": model.half(), "ema": None, "train_args": {}}, path)
    extra = ["--teacher-branch", branch] if branch else []
    r = run_cli(*dump_args(path, dataset, tmp_path / "e.zarr", *extra))
    assert r.exit_code == 0, r.output
    r = run_cli("verify", tmp_path / "e.zarr", "--samples", 4)  # the stored branch against the live teacher's
    assert r.exit_code == 0, r.output
    t = CacheReader(str(tmp_path / "e.zarr")).description.teacher
    assert (t.reg_max, t.branches, t.branch) == (1, ("one2many", "one2one"), branch or "one2many")
    assert f"end-to-end, kept branch {branch or 'one2many'}" in run_cli("info", tmp_path / "e.zarr").stdout
    live = Teacher.load(path, branch=branch)
    x = torch.full((1, 3, 64, 64), 0.5)
    raw = live.model(x)[1]
    many, one = raw["one2many"]["scores"], raw["one2one"]["scores"]
    assert (one - many).abs().min() > 1.0  # the branches differ, so the kept one can be told apart
    want = {None: many, "one2one": one, "mean": (many + one) / 2}[branch]
    got = live(x).head
    assert all(h.shape[1] == 4 + 3 for h in got)  # 4 distances, then the class logits
    assert torch.allclose(torch.cat([h[:, 4:].flatten(2) for h in got], 2), want, atol=1e-5)
    with pytest.raises(UserError, match="unknown branch 'both'"):
        Teacher.load(path, branch="both")


def test_teacher_class_count_mismatch(tmp_path, dataset, existing_store):
    before = _snapshot(existing_store)
    from softlabel.teacher import save_checkpoint_from_yaml

    four = save_checkpoint_from_yaml("yolov8n.yaml", ["a", "b", "c", "d"], tmp_path / "t4.pt")
    assert_clean_error(run_cli(*dump_args(four, dataset, existing_store)), four, "4 classes", "nc=3")
    assert _snapshot(existing_store) == before


def test_what_ultralytics_skips_is_skipped_recorded_or_refused_with_strict(tmp_path, teacher):
    root = tmp_path / "d"
    data = make_dataset(root, n_train=8, n_val=1)
    images = sorted((root / "images" / "train").glob("*"))
    truncated = next(p for p in images if p.suffix == ".jpg")
    truncated.write_bytes(truncated.read_bytes()[:200])  # a JPEG cut short: PIL cannot decode it
    label_of = lambda p: root / "labels" / "train" / f"{p.stem}.txt"  # noqa: E731
    bad_class, bad_coord = [p for p in images if p != truncated and label_of(p).is_file()][:2]
    label_of(bad_class).write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    label_of(bad_coord).write_text("0 0.5 0.5 1.02 0.2\n")
    bad = sorted(f"images/train/{p.name}" for p in (truncated, bad_class, bad_coord))

    refused = run_cli(*dump_args(teacher, data, tmp_path / "strict.zarr", "--strict"))
    assert_clean_error(refused, "--strict", "3 image(s)", *bad)
    assert not (tmp_path / "strict.zarr").exists()

    result = run_cli(*dump_args(teacher, data, tmp_path / "c.zarr"))
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("softlabel: warning:")]
    for name in bad:
        assert sum(name in ln for ln in warnings) == 1, (name, warnings)
    assert any("3 of 8 images skipped, 5 kept" in ln for ln in warnings), warnings
    attrs = store.read_attrs(str(tmp_path / "c.zarr"))
    assert sorted(attrs["data"]["skipped"]) == bad and attrs["data"]["count"] == 5
    stored = list(np.asarray(zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["samples/path"][:]))
    assert not set(bad) & set(stored) and len(stored) == 5
    assert "3 skipped as Ultralytics skips them" in run_cli("info", tmp_path / "c.zarr").stdout
    # train lists the data the same way: the same images skipped, the cache accepted
    from softlabel.train import check_cache_matches

    spec = load_data_yaml(data)
    desc = CacheReader(str(tmp_path / "c.zarr")).description
    check_cache_matches(desc, spec, build_index(spec, warn=None), 64, "c.zarr")
    label_of(bad_coord).write_text("0 0.5 0.5 0.2 0.2\n")  # fixed after the dump: the data is no longer the cache's
    with pytest.raises(UserError, match="skipped"):
        check_cache_matches(desc, spec, build_index(spec, warn=None), 64, "c.zarr")

    empty = tmp_path / "empty"
    (empty / "images" / "train").mkdir(parents=True)
    (empty / "data.yaml").write_text(f"path: {empty}\ntrain: images/train\nval: images/train\nnames: [{', '.join(NAMES[:3])}]\n")
    assert_clean_error(run_cli(*dump_args(teacher, empty / "data.yaml", tmp_path / "c4.zarr")), "No images found")
    assert not (tmp_path / "c4.zarr").exists()


def test_newer_schema_is_refused(tmp_path, existing_store):
    group = zarr.open_group(str(existing_store), mode="r+")
    group.attrs["schema_version"] = 99
    assert_clean_error(run_cli("info", existing_store), "schema version 99", "upgrade")


def test_older_schema_is_refused_naming_a_redump(tmp_path, existing_store):
    group = zarr.open_group(str(existing_store), mode="r+")
    for old in (1, 2, 3, 4):  # 4: records not sealed to their sample; 3: feature rows for every kept anchor
        group.attrs["schema_version"] = old
        assert_clean_error(run_cli("info", existing_store), "older softlabel", f"schema {old}", "seals each record", "re-dump")


def test_reader_fast_path_equals_zarr_for_every_sample(dumped):
    reader = CacheReader(str(dumped))
    group = zarr.open_group(str(dumped), mode="r")
    for view in ("v0", "v1", "c0"):
        for i in range(12):
            s = reader.read(view, i)
            for name in reader.layout.stored(view):
                assert np.array_equal(reader._sample(name, i), np.asarray(group[name][i]))
            for lvl in reader.levels:
                assert np.array_equal(s.feat[lvl], np.asarray(group[f"{view}/feat/{lvl}"][i]))
            assert s.fingerprint == np.asarray(group[f"{view}/fingerprint"][i]).tobytes()
    # a local store is read without zarr's event loop
    assert all(r is not None for r in reader._fast_readers.values())
