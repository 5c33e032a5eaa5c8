"""A small real detection dataset that needs no download: scikit-learn's handwritten digits
(1,797 scanned 8x8 digits, 10 classes) composed into multi-digit scenes in Ultralytics format.

Each scene puts several digits of varied size, slant and ink on a textured, noisy background,
together with unlabelled clutter (strokes, blobs, noise patches and fragments of digits) that a
detector must learn to ignore. Train and val scenes are drawn from disjoint sets of digit images,
so validation measures recognition of handwriting the model has never seen. Everything is a pure
function of the settings, seed included.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from softlabel.errors import UserError

NAMES = [str(d) for d in range(10)]
MANIFEST = "digits.json"
FORMAT = 1  # bump when the drawing changes, so old folders are rebuilt rather than reused


@dataclass(frozen=True)
class DigitsSettings:
    n_train: int = 400  # scenes
    n_val: int = 100
    canvas: int = 192  # typical scene side in pixels; each scene varies around it
    min_digit: int = 16  # digit height range in pixels
    max_digit: int = 64
    max_digits: int = 6  # per scene
    # 0: uniform 1..max_digits. Above 0: a long-tailed count with this mean, capped at max_digits, as in
    # COCO (about 7 objects per image, a few with 50 or more); a full scene places fewer
    mean_digits: float = 0.0
    val_fraction: float = 0.25  # share of the 1,797 digit images kept for val scenes
    seed: int = 0
    # the digit classes drawn, empty for all ten; label i is classes[i]. Two disjoint sets make two tasks
    # that share no digit image (a source task to pretrain on, a target task), whatever the split seed
    classes: tuple[int, ...] = ()
    # 0: ink of any colour that contrasts with the background, one class per digit. 2..8: each digit is inked in
    # one of `inks` hues and (digit, hue) is its class, so ten digits make 10 * inks classes (8: COCO's 80)
    inks: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("mean_digits", "classes", "inks"):  # folders drawn before a setting existed stay valid
            if not d[key]:
                del d[key]
        if "classes" in d:
            d["classes"] = list(d["classes"])
        return {"format": FORMAT, **d}

    @property
    def names(self) -> list[str]:
        digits = [str(c) for c in self.classes] if self.classes else list(NAMES)
        if self.inks < 2:
            return digits
        return [f"{d}-{hue_name(h, self.inks)}" for h in range(self.inks) for d in digits]  # label: hue * len(digits) + digit


# names of the hues 45 degrees apart; DigitsSettings.inks spaces its hues evenly round the wheel
HUES = ("red", "orange", "lime", "green", "cyan", "azure", "violet", "rose")
MAX_INKS = len(HUES)


def hue_name(hue: int, inks: int) -> str:
    """The name nearest to ink hue `hue` of `inks` (distinct for every inks in 2..8)."""
    return HUES[round(hue_degrees(hue, inks) / 45.0) % len(HUES)]


def hue_degrees(hue: int, inks: int) -> float:
    """The centre of ink hue `hue` of `inks`, in degrees."""
    return 360.0 * hue / inks


def load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as float32 [n, 8, 8] in 0..1 (1 = ink) and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_glyphs(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and val digit indices."""
    order = np.random.default_rng([seed, 1]).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Paper- or slate-like: a base colour, smooth low-frequency shading, fine grain, sometimes ruled lines."""
    dark = rng.random() < 0.4
    base = rng.uniform(20, 90, 3) if dark else rng.uniform(150, 235, 3)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    shading = cv2.resize(rng.normal(0, 1, (gh, gw)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    tint = cv2.resize(rng.normal(0, 1, (gh, gw, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += shading[..., None] * rng.uniform(5, 25) + tint * rng.uniform(0, 8)
    img += rng.normal(0, rng.uniform(2, 12), (h, w, 3)).astype(np.float32)
    if rng.random() < 0.3:  # ruled paper
        step = int(rng.integers(12, 28))
        shade = rng.uniform(-35, 35)
        img[int(rng.integers(step)) :: step] += shade
    return img


def _ink(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """An ink colour that contrasts with the local background (dark on light, light on dark)."""
    light_bg = float(background.mean()) > 128
    tone = rng.uniform(0, 70) if light_bg else rng.uniform(180, 255)
    return np.clip(tone + rng.normal(0, 30, 3), 0, 255).astype(np.float32)


def _hued_ink(rng: np.random.Generator, background: np.ndarray, hue: int, inks: int) -> np.ndarray:
    """A saturated BGR ink of hue `hue` of `inks` (jittered by a quarter of the gap between hues), dark on light
    backgrounds and bright on dark ones, so it contrasts as _ink does and its hue names its class."""
    degrees = hue_degrees(hue, inks) + rng.uniform(-0.25, 0.25) * 360.0 / inks
    value = rng.uniform(110, 170) if float(background.mean()) > 128 else rng.uniform(200, 255)
    hsv = np.array([[[degrees % 360.0 / 2.0, rng.uniform(190, 255), value]]], np.float32)  # OpenCV: hue in 0..180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _render_glyph(rng: np.random.Generator, glyph: np.ndarray, height: int) -> np.ndarray:
    """Scale an 8x8 glyph to an alpha mask of about `height` pixels, with a random aspect, slant and thickness."""
    width = max(4, int(round(height * rng.uniform(0.7, 1.1))))
    mask = cv2.resize(glyph, (width, height), interpolation=cv2.INTER_CUBIC)
    pad = height // 4
    mask = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    h, w = mask.shape
    angle, shear = rng.uniform(-15, 15), rng.uniform(-0.2, 0.2)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[0, 1] += shear
    m[0, 2] -= shear * h / 2
    mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    # sharpen the soft upscaled edges into strokes of varied weight
    lo = rng.uniform(0.15, 0.45)
    return np.clip((mask - lo) / 0.3, 0, 1)


def _tight_box(mask: np.ndarray, threshold: float = 0.3) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask > threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _paste(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x: int, y: int) -> None:
    h, w = alpha.shape
    region = img[y : y + h, x : x + w]
    # ink opacity 0.8..1: shapes with little ink for their size (thin strokes) come out fainter
    a = alpha[..., None] * np.float32(0.8 + 0.2 * alpha.mean() / max(alpha.max(), 1e-6))
    region[:] = region * (1 - a) + colour * a


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]], margin: int) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + margin <= a0 or a1 + margin <= x0 or y1 + margin <= b0 or b1 + margin <= y0 for a0, b0, a1, b1 in taken)


def _place(rng, shape, size, taken, margin=2, tries=40):
    """A top-left corner where a size=(h, w) box fits inside the canvas without touching `taken`."""
    H, W = shape
    h, w = size
    if h >= H or w >= W:
        return None
    for _ in range(tries):
        x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
        if _free((x, y, x + w, y + h), taken, margin):
            return x, y
    return None


def _clutter(rng, img, glyphs, taken, settings: DigitsSettings) -> None:
    """Unlabelled distractors, kept clear of the labelled digits so no label is hidden."""
    H, W = img.shape[:2]
    for _ in range(int(rng.integers(1, 6))):
        kind = rng.choice(["stroke", "blob", "noise", "fragment"], p=[0.35, 0.2, 0.2, 0.25])
        size = int(rng.integers(settings.min_digit // 2, settings.max_digit))
        if kind == "fragment":  # the top, bottom, left or right part of a digit: digit-like but not a digit
            glyph = glyphs[int(rng.integers(len(glyphs)))].copy()
            side, keep = int(rng.integers(4)), int(rng.integers(2, 4))
            if side == 0:
                glyph[keep:] = 0
            elif side == 1:
                glyph[: 8 - keep] = 0
            elif side == 2:
                glyph[:, keep:] = 0
            else:
                glyph[:, : 8 - keep] = 0
            patch = _render_glyph(rng, glyph, max(size, settings.min_digit))
        else:
            patch = np.zeros((size, size), np.float32)
            if kind == "stroke":
                pts = rng.integers(0, size, (int(rng.integers(2, 5)), 1, 2)).astype(np.int32)
                cv2.polylines(patch, [pts], False, 1.0, int(rng.integers(1, max(2, size // 8) + 1)), cv2.LINE_AA)
            elif kind == "blob":
                axes = (int(rng.integers(2, size // 2 + 1)), int(rng.integers(2, size // 2 + 1)))
                cv2.ellipse(patch, (size // 2, size // 2), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
            else:
                patch = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (3, 3), 0) * rng.uniform(0.4, 0.9)
        spot = _place(rng, (H, W), patch.shape, taken)
        if spot is None:
            continue
        x, y = spot
        _paste(img, patch, _ink(rng, img[y : y + patch.shape[0], x : x + patch.shape[1]]), x, y)


def digit_count(rng: np.random.Generator, settings: DigitsSettings) -> int:
    """Digits to try to place in a non-empty scene."""
    if settings.mean_digits <= 0:
        return int(rng.integers(1, settings.max_digits + 1))
    # 1 + a negative binomial of shape 0.8: mean as asked, mode 1, a tail of crowded scenes
    extra = settings.mean_digits - 1
    return int(min(settings.max_digits, 1 + rng.negative_binomial(0.8, 0.8 / (0.8 + extra))))


def draw_scene(rng: np.random.Generator, glyphs: np.ndarray, classes: np.ndarray, settings: DigitsSettings) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One BGR uint8 scene and its labels (class, cx, cy, w, h normalised)."""
    c = settings.canvas
    H, W = int(c * rng.uniform(0.8, 1.2)), int(c * rng.uniform(0.8, 1.2))
    img = _background(rng, H, W)
    taken: list[tuple[int, int, int, int]] = []
    labels = []
    n_digits = 0 if rng.random() < 0.05 else digit_count(rng, settings)
    n_labels = len(settings.classes) or len(NAMES)  # digit labels; a hued digit's class adds hue * n_labels
    for _ in range(n_digits):
        j = int(rng.integers(len(glyphs)))
        height = int(np.exp(rng.uniform(np.log(settings.min_digit), np.log(settings.max_digit))))  # as many small as large
        mask = _render_glyph(rng, glyphs[j], height)
        box = _tight_box(mask)
        if box is None:
            continue
        bx0, by0, bx1, by1 = box
        mask = mask[by0:by1, bx0:bx1]
        spot = _place(rng, (H, W), mask.shape, taken, margin=3)
        if spot is None:
            continue  # the scene is full
        x, y = spot
        under = img[y : y + mask.shape[0], x : x + mask.shape[1]]
        label = int(classes[j])
        if settings.inks >= 2:
            hue = int(rng.integers(settings.inks))
            ink = _hued_ink(rng, under, hue, settings.inks)
            label += hue * n_labels
        else:
            ink = _ink(rng, under)
        _paste(img, mask, ink, x, y)
        h, w = mask.shape
        taken.append((x, y, x + w, y + h))
        labels.append((label, (x + w / 2) / W, (y + h / 2) / H, w / W, h / H))
    _clutter(rng, img, glyphs, taken, settings)
    if rng.random() < 0.5:  # camera softness
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.3, 1.0))
    return np.clip(img, 0, 255).astype(np.uint8), labels


def _write_split(root: Path, split: str, n: int, glyphs, classes, settings: DigitsSettings, stream: int) -> None:
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([settings.seed, stream, i])  # scene i is the same whatever n is
        img, rows = draw_scene(rng, glyphs, classes, settings)
        cv2.imwrite(str(images / f"{split}{i:05d}.png"), img)
        if rows:
            text = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in rows)
            (labels / f"{split}{i:05d}.txt").write_text(text)


def build_digits(root: str | Path, settings: DigitsSettings = DigitsSettings()) -> Path:
    """Write the scenes and data.yaml under root (replacing what is there); returns the data.yaml path."""
    if settings.min_digit < 8 or settings.max_digit < settings.min_digit or settings.max_digit >= settings.canvas * 0.8:
        raise UserError(f"digit sizes {settings.min_digit}..{settings.max_digit} px do not fit scenes of about {settings.canvas} px")
    if settings.mean_digits and not 1 <= settings.mean_digits <= settings.max_digits:
        raise UserError(f"mean_digits {settings.mean_digits} must lie between 1 and max_digits ({settings.max_digits})")
    if settings.n_train < 1 or settings.n_val < 1:
        raise UserError("the digits dataset needs at least one train and one val scene")
    if settings.classes and (len(set(settings.classes)) != len(settings.classes) or not set(settings.classes) <= set(range(10))):
        raise UserError(f"digit classes {list(settings.classes)} must be distinct digits 0-9")
    if settings.inks and not 2 <= settings.inks <= MAX_INKS:
        raise UserError(f"inks {settings.inks} must be 0 (any contrasting ink) or 2..{MAX_INKS} hues")
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    glyphs, classes = load_glyphs()
    # the split is made over all digit images first, so a class subset keeps each image on its side
    train_idx, val_idx = split_glyphs(len(glyphs), settings.val_fraction, settings.seed)
    if settings.classes:
        label = {c: i for i, c in enumerate(settings.classes)}
        train_idx, val_idx = (idx[np.isin(classes[idx], settings.classes)] for idx in (train_idx, val_idx))
        classes = np.array([label.get(int(c), -1) for c in classes], np.int64)
    _write_split(root, "train", settings.n_train, glyphs[train_idx], classes[train_idx], settings, stream=2)
    _write_split(root, "val", settings.n_val, glyphs[val_idx], classes[val_idx], settings, stream=3)
    # no 'path' key: Ultralytics and softlabel then both read the splits beside data.yaml, wherever the folder moves
    data = {"train": "images/train", "val": "images/val", "names": dict(enumerate(settings.names))}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    # the manifest goes last: a folder without it was interrupted and is rebuilt
    (root / MANIFEST).write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return yaml_path


def ensure_digits(root: str | Path, settings: DigitsSettings = DigitsSettings()) -> tuple[Path, bool]:
    """The data.yaml of a digits dataset built with these settings, and whether an existing one was reused."""
    root = Path(root)
    manifest, yaml_path = root / MANIFEST, root / "data.yaml"
    if manifest.is_file() and yaml_path.is_file():
        try:
            if json.loads(manifest.read_text()) == settings.to_dict():
                return yaml_path, True
        except json.JSONDecodeError:
            pass  # a damaged manifest: rebuild
    return build_digits(root, settings), False
