"""A tiny drawn detection dataset (filled shapes on noise) in Ultralytics format, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

NAMES = ["square", "disc", "bar"]


def make_dataset(root: Path, n_train: int = 12, n_val: int = 4, seed: int = 0, nc: int = 3, size: tuple[int, int] = (48, 120)) -> Path:
    """Draw images of varied sizes with filled shapes and write their YOLO labels and data.yaml."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(*size)), int(rng.integers(*size))
            img = np.full((h, w, 3), rng.integers(0, 80, 3), np.uint8)
            img += rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
            lines = []
            for _ in range(0 if i == 0 else int(rng.integers(1, 4))):
                c = int(rng.integers(nc))
                bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
                x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                colour = [int(v) for v in rng.integers(120, 255, 3)]
                if c == 1:
                    cv2.ellipse(img, (x0 + bw // 2, y0 + bh // 2), (bw // 2, bh // 2), 0, 0, 360, colour, -1)
                else:
                    cv2.rectangle(img, (x0, y0), (x0 + bw - 1, y0 + bh - 1), colour, -1)
                lines.append(f"{c} {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            suffix = ".jpg" if i % 3 == 2 else ".png"
            cv2.imwrite(str(root / "images" / split / f"img{i:03d}{suffix}"), img)
            if lines:  # image 0 has no label file: a background image
                (root / "labels" / split / f"img{i:03d}.txt").write_text("\n".join(lines) + "\n")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES[:nc]))}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_path
