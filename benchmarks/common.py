"""Helpers shared by the benchmark scripts: machine description, toy data, teachers, output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Ultralytics reads these once, at import time: keep its console output down and never reach the network.
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict:
    import ultralytics

    import softlabel

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ultralytics": ultralytics.__version__,
        "softlabel": softlabel.__version__,
        "device": str(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
    }
    try:
        info["load_average"] = list(os.getloadavg())  # a busy machine explains slow numbers
    except OSError:
        pass
    return info


def header(device: str = "cpu") -> dict:
    """What every result file records about how and where it was made."""
    return {
        "machine": machine(device),
        "command": " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(x: float) -> float | None:
    """JSON has no infinity: an impossible break-even is written as null."""
    return x if x == x and abs(x) != float("inf") else None


def table(headers: list[str], rows: list[list], title: str = "", footer: list[str] | None = None) -> str:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [title] if title else []
    out += [line(headers), "-" * len(line(headers))]
    out += [line(r) for r in cells]
    if footer:
        out += ["-" * len(line(headers)), *footer]
    return "\n".join(out)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or abs(value) == float("inf"):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def make_data(root: Path, images: int, val_images: int, imgsz: int, seed: int = 0, nc: int = 3) -> Path:
    """Toy shapes dataset whose source images straddle imgsz, so replay resizes both ways as on real data.

    nc > 3 names that many classes (COCO's names for nc = 80): the labels still use three of them,
    but every class-sized tensor (head, cache, loss) has the size it has at that class count."""
    from softlabel.toydata import make_dataset

    size = (max(32, imgsz // 2), max(64, imgsz * 3 // 2))
    data = make_dataset(Path(root), n_train=images, n_val=val_images, seed=seed, size=size)
    if nc > 3:
        import yaml

        raw = yaml.safe_load(data.read_text())
        raw["names"] = dict(enumerate(class_names(nc)))
        data.write_text(yaml.safe_dump(raw, sort_keys=False))
    return data


def class_names(nc: int) -> list[str]:
    """COCO's 80 class names (read from Ultralytics' own coco.yaml, no download), then numbered ones."""
    import ultralytics
    import yaml

    from softlabel.toydata import NAMES

    coco = yaml.safe_load((Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco.yaml").read_text())["names"]
    names = list(NAMES) + [n for n in coco.values() if n not in NAMES]
    return (names + [f"class{i}" for i in range(len(names), nc)])[:nc]


def data_names(data_yaml: Path) -> list[str]:
    from softlabel.data import load_data_yaml

    return list(load_data_yaml(str(data_yaml)).names)


def make_teacher(cfg: str, data_yaml: Path, path: Path) -> Path:
    """A teacher with random weights built from a model yaml (no download), sized for the dataset's classes."""
    from softlabel.teacher import save_checkpoint_from_yaml

    return save_checkpoint_from_yaml(cfg, data_names(data_yaml), path)


KEPT_HELP = ("anchors every image keeps in the sparse head: the dump runs with --head-topk N --head-floor 0. A teacher "
             "with random weights scores every anchor below the default floor (0.005) and would keep none, so its store "
             "would cost less than a trained teacher's. Default: the typical image, the share of anchors a trained teacher "
             "kept under the default rule at 640 px (results/topk.json: 135 of 8,400) applied to this image size; 512, the "
             "default cap, is the most the default store holds (an upper bound); 0: the dump's own defaults")


def add_kept_arg(parser) -> None:
    parser.add_argument("--kept", type=int, default=None, help=KEPT_HELP)


def anchors(imgsz: int, strides: tuple[int, ...] = (8, 16, 32)) -> int:
    return sum((imgsz // s) ** 2 for s in strides)


def typical_kept(imgsz: int = 640) -> int:
    """Anchors a trained teacher keeps per image under the dump's default rule, at this image size: the mean
    topk.py measured at 640 px on scenes of COCO's density, as a share of the anchors."""
    import json

    from softlabel.dump import DEFAULT_HEAD_FLOOR, DEFAULT_HEAD_TOPK

    name = f"floor{str(DEFAULT_HEAD_FLOOR).lstrip('0')}-cap{DEFAULT_HEAD_TOPK}"
    path = RESULTS / "topk.json"
    found = json.loads(path.read_text())["candidates"].get(name) if path.is_file() else None
    if not found:
        raise SystemExit(f"{path} has no {name} candidate: run benchmarks/topk.py, or give --kept")
    d = json.loads(path.read_text())
    share = found["kept_anchors"]["mean"] / d["anchors"]
    return max(1, round(share * anchors(imgsz)))


def kept_options(kept: int | None, imgsz: int) -> dict:
    """Dump options that make every image keep `kept` anchors (None: typical_kept(imgsz); 0: the dump's defaults);
    feature rows as the default, at most 64."""
    if kept is None:
        kept = typical_kept(imgsz)
    if not kept:
        return {}
    from softlabel.dump import DEFAULT_FEATURE_ROWS

    return dict(head_topk=kept, head_floor=0.0, feature_rows=min(DEFAULT_FEATURE_ROWS, kept))


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
