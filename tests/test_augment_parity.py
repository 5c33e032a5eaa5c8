"""Each replayed transform against Ultralytics 8.4's own transform class, on the same random draws."""

from __future__ import annotations

import random

import numpy as np
import pytest
import yaml
from ultralytics.data.augment import Mosaic, RandomFlip, RandomHSV, RandomPerspective
from ultralytics.utils.instance import Instances

from softlabel.augment import AugmentConfig
from softlabel.data import build_index, load_data_yaml
from softlabel.replay import Replay, affine_matrix, hsv_shift, load_resized, mosaic_centre, warp

IMGSZ = 64
SIZES = [(30, 53), (64, 40), (47, 47), (90, 31), (20, 77)]  # (h, w); most round down where Ultralytics takes the ceiling


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Images of awkward sizes with boxes of every class, and Ultralytics' training dataset over them."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.build import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    root = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(3)
    (root / "images").mkdir()
    (root / "labels").mkdir()
    import cv2

    for k, (h, w) in enumerate(SIZES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[: h // 2, : w // 3] = (250, 250, 250)  # a saturated-free patch: RandomHSV must keep it grey
        cv2.imwrite(str(root / "images" / f"p{k}.png"), image)
        rows = [f"{c} {rng.uniform(0.3, 0.7):.5f} {rng.uniform(0.3, 0.7):.5f} {rng.uniform(0.1, 0.5):.5f} {rng.uniform(0.1, 0.5):.5f}"
                for c in range(3)]
        (root / "labels" / f"p{k}.txt").write_text("\n".join(rows) + "\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "names": ["a", "b", "c"]}))
    info = check_det_dataset(str(root / "data.yaml"))
    dataset = build_yolo_dataset(get_cfg(overrides={"imgsz": IMGSZ}), info["train"], 4, info, mode="train")
    index = build_index(load_data_yaml(root / "data.yaml"), warn=None)
    assert [str(p) for p in index.images] == list(dataset.im_files)
    return dataset, index


def _ultra_labels(dataset, i: int) -> dict:
    return dataset.get_image_and_label(i)


def _xyxy(instances: Instances, w: int, h: int) -> np.ndarray:
    instances.convert_bbox("xyxy")
    if instances.normalized:
        instances.denormalize(w, h)
    return instances.bboxes


def test_resize_as_ultralytics_loads(data):
    dataset, index = data
    shapes = []
    for i, path in enumerate(index.images):
        theirs = dataset.load_image(i)[0]
        mine = load_resized(path, IMGSZ)
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), path.name
        shapes.append(mine.shape[:2])
    assert (37, 64) in shapes  # 30 * 64 / 53 = 36.2: the ceiling, where rounding would give 36


@pytest.mark.parametrize("seed", range(6))
def test_hsv_as_ultralytics(data, seed):
    dataset, _ = data
    image = _ultra_labels(dataset, seed % len(SIZES))["img"]
    gains = (0.015, 0.7, 0.4) if seed < 3 else (0.5, 0.9, 0.9)
    np.random.seed(seed)
    theirs = RandomHSV(*gains).apply_image({"img": image.copy()})["img"]
    np.random.seed(seed)
    mine = hsv_shift(image.copy(), np.random.uniform(-1, 1, 3) * list(gains))
    assert np.array_equal(mine, theirs)


CONFIGS = [
    AugmentConfig(),  # Ultralytics' defaults: scale and translate only
    AugmentConfig(degrees=12.0, shear=3.0, translate=0.2, scale=0.6),
    AugmentConfig(degrees=5.0, perspective=0.0008, scale=0.3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "rotate-shear", "perspective"])
@pytest.mark.parametrize("seed", range(4))
def test_affine_warp_as_ultralytics(data, cfg, seed):
    dataset, index = data
    i = seed % len(SIZES)
    labels = _ultra_labels(dataset, i)
    image = labels["img"].copy()
    h, w = image.shape[:2]
    boxes = _xyxy(Instances(labels["instances"].bboxes.copy(), bbox_format="xywh", normalized=True), w, h)
    rp = RandomPerspective(cfg.degrees, cfg.translate, cfg.scale, cfg.shear, cfg.perspective, size=(IMGSZ, IMGSZ))
    random.seed(seed)
    theirs = rp(labels)
    random.seed(seed)
    m, scale = affine_matrix(w, h, IMGSZ, cfg, random.uniform)
    img, cls, out = warp(image, labels["cls"].reshape(-1).copy(), boxes.astype(np.float32), m, scale, IMGSZ, bool(cfg.perspective))
    assert np.array_equal(img, theirs["img"])
    np.testing.assert_array_equal(cls, theirs["cls"].reshape(-1))
    np.testing.assert_allclose(out, _xyxy(theirs["instances"], IMGSZ, IMGSZ), atol=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_as_ultralytics(data, seed):
    dataset, index = data
    replay = Replay(index, AugmentConfig(), IMGSZ, 0)
    tiles = [(seed + k) % len(SIZES) for k in range(4)]
    labels = _ultra_labels(dataset, tiles[0])
    mosaic = Mosaic(dataset, imgsz=IMGSZ, p=1.0, n=4)
    mosaic.get_indexes = lambda: tiles[1:]  # the partners: Ultralytics' own come from a buffer of recent loads
    random.seed(seed)
    params = mosaic.get_params(labels)
    theirs = mosaic.apply_instances(mosaic.apply_image(labels, params), params)
    random.seed(seed)
    img, cls, boxes = replay._mosaic(tiles, *mosaic_centre(IMGSZ, random.uniform))
    assert np.array_equal(img, theirs["img"])
    np.testing.assert_array_equal(cls, theirs["cls"].reshape(-1))
    np.testing.assert_allclose(boxes, _xyxy(theirs["instances"], 2 * IMGSZ, 2 * IMGSZ), atol=1e-3)


class _PythonDraws:
    """The replay's generator interface, answered from Python's `random` as Ultralytics draws."""

    def random(self, n: int) -> np.ndarray:
        return np.array([random.random() for _ in range(n)])


@pytest.mark.parametrize("seed", range(8))
def test_flips_as_ultralytics(data, seed):
    dataset, index = data
    replay = Replay(index, AugmentConfig(flipud=0.5, fliplr=0.5), IMGSZ, 0)
    labels = _ultra_labels(dataset, seed % len(SIZES))
    random.seed(7)
    mosaic = Mosaic(dataset, imgsz=IMGSZ, p=1.0, n=4)
    mosaic.get_indexes = lambda: [1, 2, 3]
    params = mosaic.get_params(labels)
    labels = mosaic.apply_instances(mosaic.apply_image(labels, params), params)
    labels = RandomPerspective(size=(IMGSZ, IMGSZ))(labels)  # a square image, as the flips get it
    image, boxes = labels["img"].copy(), _xyxy(Instances(labels["instances"].bboxes.copy(), bbox_format="xyxy", normalized=False),
                                               IMGSZ, IMGSZ)
    random.seed(seed)
    theirs = RandomFlip(0.5, "horizontal")(RandomFlip(0.5, "vertical")(labels))
    random.seed(seed)
    img, out = replay._flips(image, boxes, _PythonDraws())
    assert np.array_equal(img, theirs["img"])
    np.testing.assert_allclose(out, _xyxy(theirs["instances"], IMGSZ, IMGSZ), atol=1e-3)
