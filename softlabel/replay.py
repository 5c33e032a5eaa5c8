"""Seed-replayable augmentation: (index, view, seed) -> the same uint8 image and labels, anywhere.

Every random draw comes from one generator built from (seed, view kind, view number, index) and
passed down explicitly. Nothing here reads or advances Python's `random`, NumPy's global state
or torch's RNG, so a sample does not depend on the process, the worker, the order or the history.

Mosaic partners come from the image's group: for each mosaic view a permutation of the images,
drawn from (seed, view) alone, is cut into consecutive blocks of `mosaic_group` images, and an
image's 3 mosaic partners (and its mixup partner, with that one's own partners) are drawn among
the members of its block. A loader that visits a view group by group (softlabel.train.sampler)
then reads each image from disk about once per epoch, as Ultralytics' buffer of recent loads does,
however large the dataset.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import crc32c
import cv2
import numpy as np

from softlabel.augment import AugmentConfig
from softlabel.data import DatasetIndex
from softlabel.errors import UserError

PAD_VALUE = 114  # Ultralytics' border grey
FINGERPRINT_BYTES = 16


class View(NamedTuple):
    """A mosaic view ("v", k) or a closing, no-mosaic view ("c", m)."""

    kind: str
    number: int

    @property
    def key(self) -> str:
        return f"{self.kind}{self.number}"

    @classmethod
    def parse(cls, key: str) -> "View":
        if len(key) < 2 or key[0] not in "vc" or not key[1:].isdigit():
            raise ValueError(f"not a view key: {key!r} (expected v<k> or c<m>)")
        return cls(key[0], int(key[1:]))


def all_views(views: int, close_views: int) -> list[View]:
    return [View("v", k) for k in range(views)] + [View("c", m) for m in range(close_views)]


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 [imgsz, imgsz, 3], BGR as OpenCV reads it
    labels: np.ndarray  # float32 [n, 5]: class, cx, cy, w, h normalised to the image
    fingerprint: bytes


def fingerprint(image: np.ndarray, labels: np.ndarray) -> bytes:
    """128 bits that tie a cached tensor to its exact teacher input: shape, pixel bytes and labels.

    Four CRC-32C, one per quarter of the pixel bytes, each started from the CRC of the shape and the
    labels: any change of shape or labels changes all four, any change of up to 32 consecutive bits
    of pixels (a changed pixel) changes its quarter's. It guards against replaying the wrong input,
    not against forgery, and costs a twentieth of a cryptographic hash of a 640 px image."""
    head = np.asarray(image.shape, np.int64).tobytes() + np.ascontiguousarray(labels, np.float32).tobytes()
    pixels = memoryview(np.ascontiguousarray(image)).cast("B")
    quarter = -(-len(pixels) // 4)
    crcs = [crc32c.crc32c(pixels[k * quarter : (k + 1) * quarter], crc32c.crc32c(head + bytes([k]))) for k in range(4)]
    return np.asarray(crcs, "<u4").tobytes()


@dataclass(frozen=True, eq=False)
class Groups:
    """The partner groups of one mosaic view: group k is order[starts[k]:starts[k + 1]]."""

    order: np.ndarray  # a permutation of the images
    starts: np.ndarray  # [groups + 1] block boundaries in order
    of: np.ndarray  # [n] each image's group

    def members(self, k: int) -> np.ndarray:
        return self.order[self.starts[k] : self.starts[k + 1]]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def all(self) -> list[np.ndarray]:
        return [self.members(k) for k in range(len(self))]


def mosaic_groups(n: int, size: int, seed: int, view: "View") -> Groups:
    """Cut a permutation of n images, drawn from (seed, view) alone, into blocks of `size`; a short
    last block joins the one before it, and fewer than 2 * size images make one group."""
    if view.kind != "v":
        raise ValueError(f"view {view.key} has no mosaic and no partner groups")
    # kind 2: a stream no sample's generator (kinds 0 and 1) can share
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 2, view.number, n]))).permutation(n)
    count = max(1, n // size)
    starts = np.minimum(np.arange(count + 1) * size, n)
    starts[-1] = n
    of = np.empty(n, np.int64)
    of[order] = np.minimum(np.arange(n) // size, count - 1)
    return Groups(order, starts, of)


def generator_for(seed: int, view: View, index: int) -> np.random.Generator:
    kind = 0 if view.kind == "v" else 1
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, kind, view.number, index])))


def _child(rng: np.random.Generator) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(rng.integers(2**63))))


def load_resized(path, imgsz: int) -> np.ndarray:
    """Read an image as Ultralytics' training dataset does and resize its long side to imgsz,
    each side rounded up as Ultralytics 8.4 rounds it."""
    from ultralytics.utils.patches import imread

    image = imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"{path}: unreadable or corrupt image")
    h0, w0 = image.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        size = (min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return image


def _boxes_xyxy(labels: np.ndarray, w: int, h: int) -> np.ndarray:
    cx, cy, bw, bh = labels[:, 1] * w, labels[:, 2] * h, labels[:, 3] * w, labels[:, 4] * h
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)


def mosaic_centre(size: int, uniform) -> tuple[int, int]:
    """(xc, yc): where the four tiles of a mosaic meet, from draws in Ultralytics' order (y, then x)."""
    yc = int(uniform(size // 2, 2 * size - size // 2))
    xc = int(uniform(size // 2, 2 * size - size // 2))
    return xc, yc


def affine_matrix(width: int, height: int, size: int, augment: AugmentConfig, uniform) -> tuple[np.ndarray, float]:
    """The 3x3 float32 warp of Ultralytics 8.4's RandomPerspective for an image of width x height
    and an output of size x size: centre, perspective, rotation and scale, shear, translation.

    `uniform(low, high)` supplies the draws in Ultralytics' order (perspective x, y; angle; scale;
    shear x, y; translation x, y), so the same draws give the same matrix."""
    a = augment
    centre = np.eye(3, dtype=np.float32)
    centre[0, 2], centre[1, 2] = -width / 2, -height / 2
    persp = np.eye(3, dtype=np.float32)
    persp[2, 0] = uniform(-a.perspective, a.perspective)
    persp[2, 1] = uniform(-a.perspective, a.perspective)
    angle = uniform(-a.degrees, a.degrees)
    scale = uniform(1 - a.scale, 1 + a.scale)
    rot = np.eye(3, dtype=np.float32)
    rot[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=scale)
    shear = np.eye(3, dtype=np.float32)
    shear[0, 1] = math.tan(uniform(-a.shear, a.shear) * math.pi / 180)
    shear[1, 0] = math.tan(uniform(-a.shear, a.shear) * math.pi / 180)
    shift = np.eye(3, dtype=np.float32)
    shift[0, 2] = uniform(0.5 - a.translate, 0.5 + a.translate) * size
    shift[1, 2] = uniform(0.5 - a.translate, 0.5 + a.translate) * size
    return shift @ shear @ rot @ persp @ centre, scale


def warp(image: np.ndarray, cls: np.ndarray, boxes: np.ndarray, m: np.ndarray, scale: float, size: int, perspective: bool):
    """Warp the image to size x size with m; move the xyxy pixel boxes with it, clip them, and keep
    those that stay visible (over 2 px each side, over 10% of their scaled area, not slivers)."""
    border = (PAD_VALUE,) * 3
    if perspective:
        image = cv2.warpPerspective(image, m, dsize=(size, size), borderValue=border)
    else:
        image = cv2.warpAffine(image, m[:2], dsize=(size, size), borderValue=border)
    n = len(boxes)
    if n == 0:
        return image, cls, boxes
    corners = np.ones((n * 4, 3), dtype=boxes.dtype)
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 2)
    corners = corners @ m.T
    xy = (corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]).reshape(n, 8)
    xs, ys = xy[:, 0::2], xy[:, 1::2]
    new = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1).astype(boxes.dtype)
    new = np.clip(new, 0, size)
    before = boxes * scale
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    keep = (w2 > 2) & (h2 > 2) & (w2 * h2 / (w1 * h1 + 1e-16) > 0.1) & (aspect < 100)
    return image, cls[keep], new[keep]


def hsv_shift(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Ultralytics 8.4's RandomHSV for drawn offsets (hue, saturation, value), each already times its
    gain: hue moves by shift*180 and wraps at 180, saturation and value scale by 1 + shift, and a
    pixel without saturation keeps none."""
    x = np.arange(256, dtype=np.float64)
    lut = np.stack([(x + shift[0] * 180) % 180, np.clip(x * (shift[1] + 1), 0, 255), np.clip(x * (shift[2] + 1), 0, 255)], -1)
    lut = lut.astype(np.uint8)
    lut[0, 1] = 0
    hsv = cv2.LUT(cv2.cvtColor(image, cv2.COLOR_BGR2HSV), lut.reshape(1, 256, 3))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


class Replay:
    """The augmentation pipeline of one dataset at one image size and seed."""

    def __init__(self, index: DatasetIndex, augment: AugmentConfig, imgsz: int, seed: int, cache_bytes: int = 512 << 20):
        if imgsz % 32:
            raise UserError(f"imgsz must be a multiple of 32 (the largest stride), got {imgsz}")
        self.index = index
        self.augment = augment
        self.imgsz = imgsz
        self.seed = seed
        self._albu = None
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._groups: dict[View, Groups] = {}

    def __getstate__(self):
        # a worker starts with an empty cache of its own rather than a pickled copy of ours
        state = self.__dict__.copy()
        state["_cache"], state["_cached_bytes"], state["_albu"], state["_groups"] = OrderedDict(), 0, None, {}
        return state

    def groups(self, view: View) -> Groups:
        """The partner groups of a mosaic view (computed once per process and view)."""
        if view not in self._groups:
            self._groups[view] = mosaic_groups(len(self.index), self.augment.mosaic_group, self.seed, view)
        return self._groups[view]

    def group_of(self, i: int, view: View) -> np.ndarray:
        """The images image i of mosaic view `view` draws its partners from (i among them)."""
        groups = self.groups(view)
        return groups.members(int(groups.of[i]))

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, i: int, view: View) -> Sample:
        if not 0 <= i < len(self.index):
            raise IndexError(f"sample {i} out of range for {len(self.index)} images")
        rng = generator_for(self.seed, view, i)
        members = None if view.kind == "c" else self.group_of(i, view)
        image, cls, boxes = self._geometric(i, rng, members)
        if members is not None:
            gate, pick, child, ratio = rng.uniform(0, 1), int(rng.integers(len(members))), _child(rng), rng.beta(32.0, 32.0)
            if not gate > self.augment.mixup:
                image2, cls2, boxes2 = self._geometric(int(members[pick]), child, members)
                image = (image * ratio + image2 * (1 - ratio)).astype(np.uint8)
                cls, boxes = np.concatenate([cls, cls2]), np.concatenate([boxes, boxes2])
        image = self._pixel(image, rng)
        image, boxes = self._flips(image, boxes, rng)
        labels = self._normalised(cls, boxes)
        image = np.ascontiguousarray(image)  # a no-op unless no step above wrote a new array
        return Sample(image=image, labels=labels, fingerprint=fingerprint(image, labels))

    # geometry -------------------------------------------------------------------------------

    def _image(self, i: int) -> np.ndarray:
        """The resized image, from a per-process cache: a mosaic reads four images, mostly ones
        read recently. Cached arrays are never written to, so the cache cannot change a sample."""
        image = self._cache.get(i)
        if image is None:
            image = load_resized(self.index.images[i], self.imgsz)
            self._cache[i] = image
            self._cached_bytes += image.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        else:
            self._cache.move_to_end(i)
        return image

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = self._image(i)
        labels = self.index.labels[i]
        h, w = image.shape[:2]
        return image, labels[:, 0].copy(), _boxes_xyxy(labels, w, h)

    def _geometric(self, i: int, rng: np.random.Generator, members: np.ndarray | None):
        """Mosaic with 3 partners from `members` (None: no mosaic) or the single resized image, then the
        random affine warp to imgsz, as Ultralytics' Mosaic and RandomPerspective do. Every draw is
        taken whether used or not, so the stream of draws has one shape for every sample."""
        s = self.imgsz
        gate = rng.uniform(0, 1)
        picks = rng.integers(len(self.index) if members is None else len(members), size=3)
        xc, yc = mosaic_centre(s, rng.uniform)
        if members is not None and not gate > self.augment.mosaic:  # Ultralytics skips a mix when its draw exceeds p
            image, cls, boxes = self._mosaic([i, *members[picks].tolist()], xc, yc)
        else:
            image, cls, boxes = self._load(i)
        m, scale = affine_matrix(image.shape[1], image.shape[0], s, self.augment, rng.uniform)
        return warp(image, cls, boxes, m, scale, s, perspective=bool(self.augment.perspective))

    def _mosaic(self, indices: list[int], xc: int, yc: int):
        """Four images meet at (xc, yc) on a 2s x 2s canvas; the affine step crops it back to s."""
        s2 = 2 * self.imgsz
        canvas = np.full((s2, s2, 3), PAD_VALUE, np.uint8)
        all_cls, all_boxes = [], []
        for tile, i in enumerate(indices):
            image, cls, boxes = self._load(i)
            h, w = image.shape[:2]
            right, below = tile in (1, 3), tile in (2, 3)
            x0, x1 = (xc, min(xc + w, s2)) if right else (max(xc - w, 0), xc)
            y0, y1 = (yc, min(yc + h, s2)) if below else (max(yc - h, 0), yc)
            # the part of the tile that fits: its inner corner touches the centre
            sx0 = 0 if right else w - (x1 - x0)
            sy0 = 0 if below else h - (y1 - y0)
            canvas[y0:y1, x0:x1] = image[sy0 : sy0 + (y1 - y0), sx0 : sx0 + (x1 - x0)]
            all_cls.append(cls)
            all_boxes.append(boxes + np.array([x0 - sx0, y0 - sy0] * 2, np.float32))
        boxes = np.clip(np.concatenate(all_boxes), 0, s2)
        keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0  # boxes left outside the canvas
        return canvas, np.concatenate(all_cls)[keep], boxes[keep]

    # pixels ---------------------------------------------------------------------------------

    def _albumentations(self):
        if self._albu is None:
            import albumentations as A

            self._albu = A.Compose([A.Blur(p=0.01), A.MedianBlur(p=0.01), A.ToGray(p=0.01), A.CLAHE(p=0.01)])
        return self._albu

    def _pixel(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.augment
        albu_np, albu_py = _child(rng), int(rng.integers(2**63))
        shift = rng.uniform(-1, 1, 3) * [a.hsv_h, a.hsv_s, a.hsv_v]
        if a.albumentations:
            compose = self._albumentations()
            # albumentations keeps its own generators; seeding them per call makes the call pure
            compose.set_random_state(albu_np, random.Random(albu_py))
            image = compose(image=image)["image"]
        if a.hsv_h or a.hsv_s or a.hsv_v:
            image = hsv_shift(image, shift)
        return image

    def _flips(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator):
        s = self.imgsz
        ud, lr = rng.random(2)
        ud, lr = ud < self.augment.flipud, lr < self.augment.fliplr
        if ud:
            boxes = np.stack([boxes[:, 0], s - boxes[:, 3], boxes[:, 2], s - boxes[:, 1]], 1)
        if lr:
            boxes = np.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], 1)
        if ud or lr:
            # one contiguous copy: OpenCV's flip is many times faster than copying a reversed NumPy view
            image = cv2.flip(np.ascontiguousarray(image), -1 if ud and lr else 0 if ud else 1)
        return image, boxes

    def _normalised(self, cls: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        s = float(self.imgsz)
        boxes = np.clip(boxes.reshape(-1, 4), 0, s)
        xywh = np.stack(
            [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]],
            1,
        ) / s
        return np.concatenate([cls.reshape(-1, 1), xywh], 1).astype(np.float32)
