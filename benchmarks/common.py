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
    from ultralytics.utils.torch_utils import get_cpu_info

    import softlabel

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": get_cpu_info(),  # the CPU's name: one 2-core machine is not another
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ultralytics": ultralytics.__version__,
        "softlabel": softlabel.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
    }
    try:
        info["load_average"] = list(os.getloadavg())  # a busy machine explains slow numbers
    except OSError:
        pass
    return info


def device_name(device: str = "cpu") -> str:
    """What the benchmark ran on: the GPU's name (torch.cuda.get_device_name; the first of a list such as 0,1) for
    a CUDA device, "cpu" for the CPU, else the device as given."""
    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return "cpu"
    first = d.split(",")[0].replace("cuda:", "").replace("cuda", "") or "0"
    if torch.cuda.is_available() and first.isdigit() and int(first) < torch.cuda.device_count():
        return torch.cuda.get_device_name(int(first))
    return d


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
    """A teacher with random weights built from a model yaml (no download), sized for the dataset's classes; the same
    weights on every call (seed 0), so a benchmark on a random teacher repeats its bytes."""
    from softlabel.teacher import save_checkpoint_from_yaml

    torch.manual_seed(0)
    return save_checkpoint_from_yaml(cfg, data_names(data_yaml), path)


KEPT_HELP = ("anchors a typical image keeps in the default store (for a DFL head cap 512, floor 0.005; for a distance "
             "head cap 1024, floor 0.001). A teacher with random weights scores every anchor below the floor and would keep "
             "none, and its vanishing features compress unlike a trained teacher's; so its batch norms are set from the data "
             "and its class biases shifted until an image keeps N anchors on average (calibrate_teacher). Default: the share "
             "of anchors a trained teacher kept at 640 px (results/topk.json: 135 of 8,400; topk-yolo26-one2many.json: 215) "
             "at this image size. The cap or more: every image keeps the cap, dumped with --head-floor 0, an upper bound on "
             "bytes and time. 0: the raw random teacher")


def add_kept_arg(parser) -> None:
    parser.add_argument("--kept", type=int, default=None, help=KEPT_HELP)


def anchors(imgsz: int, strides: tuple[int, ...] = (8, 16, 32)) -> int:
    return sum((imgsz // s) ** 2 for s in strides)


# where benchmarks/topk.py's measurement of a trained teacher lies, per box form of the head
TOPK_RESULTS = {"bins": "topk.json", "distances": "topk-yolo26-one2many.json"}


def cfg_reg_max(cfg: str) -> int:
    """The reg_max of a model yaml (YOLO26: 1; DFL heads: Ultralytics' default 16)."""
    from ultralytics.nn.tasks import yaml_model_load

    return int(yaml_model_load(cfg).get("reg_max", 16))


def typical_kept(imgsz: int = 640, reg_max: int = 16) -> int:
    """Anchors a trained teacher keeps per image under the dump's default rule for its head, at this image size: the
    mean topk.py measured at 640 px on scenes of COCO's density, as a share of the anchors."""
    import json

    from softlabel.dump import store_defaults

    floor, cap = store_defaults(reg_max).floor, store_defaults(reg_max).topk
    path = RESULTS / TOPK_RESULTS["bins" if reg_max > 1 else "distances"]
    d = json.loads(path.read_text()) if path.is_file() else {"candidates": {}}
    found = next((c for c in d["candidates"].values() if c["head_topk"] == cap and c["head_floor"] == floor), None)
    if not found:
        raise SystemExit(f"{path} has no candidate with floor {floor} and cap {cap}: run benchmarks/topk.py, or give --kept")
    return max(1, round(found["kept_anchors"]["mean"] / d["anchors"] * anchors(imgsz)))


def make_kept_teacher(cfg: str, data_yaml: Path, path: Path, imgsz: int, kept: int | None,
                      device: str = "cpu") -> tuple[Path, dict | None]:
    """make_teacher, calibrated (calibrate_teacher, on `device`) to `kept` anchors on a typical image: None, or the cap
    and more, to typical_kept(imgsz); 0: not calibrated."""
    from softlabel.dump import store_defaults

    make_teacher(cfg, data_yaml, path)
    if kept == 0:
        return path, None
    reg_max = cfg_reg_max(cfg)
    target = typical_kept(imgsz, reg_max) if kept is None or kept >= store_defaults(reg_max).topk else kept
    return path, calibrate_teacher(path, data_yaml, imgsz, target, device=device)


def kept_dump_options(kept: int | None, reg_max: int = 16) -> dict:
    """The dump's options beside its defaults for a head with this reg_max: --head-floor 0 when every image is to keep the cap."""
    from softlabel.dump import store_defaults

    return {"head_floor": 0.0} if kept and kept >= store_defaults(reg_max).topk else {}


def kept_stats(store: str) -> dict:
    """Anchors the images of a sparse store's first view kept: mean, min, max."""
    import zarr

    kept = (zarr.open_group(store, mode="r")["v0/head/index"][:] >= 0).sum(1)
    return {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max())}


@torch.no_grad()
def calibrate_teacher(path: Path, data_yaml: Path, imgsz: int, kept: int, images: int = 16, device: str = "cpu") -> dict:
    """Set a random-weight teacher's batch-norm statistics from the data, scale its class-logit convolutions to a
    spread of about one unit between anchors, then shift their biases by one constant, so that the first `images`
    training images (their first mosaic view) keep `kept` anchors above the dump's default floor for the head on average;
    rewrites the checkpoint (float32).

    A random head scores every anchor near its prior (about 1e-4), below the floor, so a default store of it keeps
    no anchor and costs less to write, read and distil than a trained teacher's; its vanishing features and constant
    logits compress far better than a trained teacher's too. The rank of anchors within an image is kept.

    The forward passes run on `device` (cpu, 0, ...: a large teacher at 640 px takes seconds on a GPU, about a minute
    on 16 CPU cores); the checkpoint is written from the CPU."""
    import numpy as np

    from softlabel.augment import load_augment
    from softlabel.data import build_index, load_data_yaml
    from softlabel.replay import Replay, View
    from softlabel.dump import resolve_device, store_defaults
    from softlabel.select import logit
    from softlabel.teacher import Teacher

    # the first mosaic view of the first images, replayed as the dump replays them (default augmentation, seed 0)
    index = build_index(load_data_yaml(data_yaml), "train", check_images=False)
    replay = Replay(index, load_augment(None), imgsz, 0)
    x = np.stack([replay(i, View("v", 0)).image for i in range(min(images, len(index)))])
    dev = resolve_device(str(device))
    x = (torch.from_numpy(x[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255).to(dev)

    def best_logits(teacher: Teacher) -> torch.Tensor:  # [B, A]: each anchor's best class logit, sorted descending
        head = torch.cat([h.flatten(2) for h in teacher(x).head], 2)
        return head[:, 4 * teacher.info.reg_max :].float().amax(1).sort(1, descending=True).values

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt["model"].float()
    floor = float(logit(torch.tensor(store_defaults(int(model.model[-1].reg_max)).floor)))  # the floor of this head's default store
    last = [branch[-1] for branch in model.model[-1].cv3]  # the class-logit convolutions, one per level
    # freshly initialised batch norms shrink the signal layer by layer (neck features of about 1e-7, every anchor's
    # logits equal to the bias): set their statistics from these images, as a trained network's are set from its data
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch
    model.to(dev).train()
    model(x)
    model.eval().cpu()
    ckpt["model"] = model
    torch.save(ckpt, path)
    # widen the class logits to about one unit between anchors, so that a threshold cuts between anchors rather than
    # between whole levels (each level's prior bias differs)
    teacher = Teacher.load(path, device=dev, amp=False)
    head = [h.float()[:, 4 * teacher.info.reg_max :] for h in teacher(x).head]
    spread = float(torch.stack([h.flatten(2).std(2).mean() for h in head]).mean())
    for conv in last:
        conv.weight *= 1.0 / max(spread, 1e-6)
    ckpt["model"] = model
    torch.save(ckpt, path)
    scores = best_logits(Teacher.load(path, device=dev, amp=False))
    cap = store_defaults(int(model.model[-1].reg_max)).topk

    def mean_kept(shift: float) -> float:
        return float((scores + shift >= floor).sum(1).clamp(max=cap).float().mean())

    lo, hi = floor - float(scores.max()) - 1, floor - float(scores.min()) + 1  # none kept, every slot kept
    for _ in range(60):  # the mean kept count grows with the shift: bisect for the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_kept(mid) < kept else (lo, mid)
    shift = hi
    for conv in last:
        conv.bias += shift
    torch.save(ckpt, path)  # float32: rounding to float16 would move whole bands of near-equal logits across the floor
    counts = (best_logits(Teacher.load(path, device=dev, amp=False)) >= floor).sum(1).clamp(max=cap).float()
    return {"kept_target": kept, "weight_scale": 1.0 / max(spread, 1e-6), "bias_shift": shift, "images": len(x),
            "kept_mean": float(counts.mean()), "kept_min": float(counts.min()), "kept_max": float(counts.max())}


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
