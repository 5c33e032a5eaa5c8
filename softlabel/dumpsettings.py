"""The settings of a dump and their defaults, in one place: `softlabel dump` shows these defaults, and
`softlabel.dump` runs with them."""

from __future__ import annotations

from dataclasses import dataclass, fields

from softlabel.cache.codecs import DEFAULT_CODEC
from softlabel.views import DEFAULT_VIEWS

# A sparse head keeps up to a cap of anchors per image whose teacher score is at least a floor: at 640 px
# with a trained teacher every term's loss and gradient stay close to the whole outputs'
# (benchmarks/topk.py). Feature rows are stored for the 64 most confident of them only, which is
# what the default feature term reads ('positions: 64'), so a sample-view stays small (README, Storage).
DEFAULT_FEATURE_ROWS = 64


@dataclass(frozen=True)
class StoreDefaults:
    """The precision, floor and cap a store takes unless told otherwise, for one box form of the teacher's head."""

    precision: str
    floor: float
    topk: int
    box_precision: str | None = None  # a sparse head's box outputs apart at this precision; None: beside the logits


# Chosen per box form with benchmarks/topk.py at 640 px on a trained 80-class teacher (README, "Contract 3").
# DFL bins (YOLOv8, 11, ...): int8, floor 0.005, cap 512 keep every term within 1%. Distances (YOLO26): an int8
# scale per image and side rounds small boxes' distances (box gradient 20% off), int8 logits and feature rows miss
# by about 3%, and the weaker scores of its dense branch leave more below 0.005: float16 with floor 0.001 is within
# 1%. Its lower floor passes up to 622 anchors on a crowded image, so its cap is 1024. Its distances are kept apart
# in float32: a box loss on distances (IoU, L1) has a kink where a student's side equals the teacher's, and a
# float16 step (2**-9 near 2 grid units) puts a side on the other side of it (box gradient 5.9% off at one anchor).
STORE_DEFAULTS = {"bins": StoreDefaults("int8", 0.005, 512), "distances": StoreDefaults("float16", 0.001, 1024, "float32")}
SAME = "same"  # --box-precision: the box outputs beside the class logits, at --precision
DEFAULT_HEAD_FLOOR = STORE_DEFAULTS["bins"].floor
DEFAULT_HEAD_TOPK = STORE_DEFAULTS["bins"].topk


def store_defaults(reg_max: int) -> StoreDefaults:
    """The store defaults for a teacher head with this reg_max."""
    return STORE_DEFAULTS["bins" if reg_max > 1 else "distances"]


def describe_defaults(what: str) -> str:
    """One store default per box form, as the CLI's help shows it: 'int8 for DFL heads, float16 for distance heads'."""
    return " for DFL heads (YOLOv8, 11, ...), ".join(str(getattr(STORE_DEFAULTS[form], what) or SAME) for form in ("bins", "distances")) \
        + " for distance heads (YOLO26)"

# A teacher too weak to score anchors above the floor keeps none, and the class, box and feature terms,
# which read the kept anchors, are zero all training long. Measured on the first batch a dump runs,
# before anything of it is written; below this many kept anchors per image on average, the dump warns.
FEW_KEPT = 4


@dataclass
class DumpSettings:
    teacher: str
    data: str
    out: str
    views: int = DEFAULT_VIEWS
    close_views: int = 1
    imgsz: int = 640
    batch: int = 16
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    augment: str | None = None
    levels: list[str] | None = None  # feature levels to keep; None keeps all
    features: bool = True
    feature_layout: str = "sparse"  # "sparse": rows at the sparse head's kept anchors; "dense": whole maps
    overwrite: bool = False
    codec: str = DEFAULT_CODEC  # a preset for every tensor, or "head=PRESET,feat=PRESET"
    # The defaults (STORE_DEFAULTS for the teacher's box form, DEFAULT_FEATURE_ROWS) keep a
    # 640 px, 80-class YOLOv8x or yolo26x sample-view small, features included (README, Storage).
    precision: str | None = None  # None: STORE_DEFAULTS' for the teacher's head
    # a sparse head's box outputs apart at this precision, or SAME; None: STORE_DEFAULTS' (after resolve_head, None is SAME)
    box_precision: str | None = None
    head_topk: int | None = None  # sparse head: anchors kept per image; 0: every anchor (a dense head); None: STORE_DEFAULTS'
    # (after resolve_head, None is a dense head)
    head_floor: float | None = None  # sparse head: minimum teacher score of a kept anchor; None: STORE_DEFAULTS'
    # sparse features: rows for the first F kept slots; None: DEFAULT_FEATURE_ROWS, or K if that is smaller
    feature_rows: int | None = None
    shard_size: int = 16
    progress: bool = True
    strict: bool = False  # refuse images Ultralytics would skip, instead of skipping them
    half: bool = True  # float16 teacher on CUDA (the precision used is recorded as teacher.compute_dtype)
    branch: str | None = None  # an end-to-end teacher: the branch whose outputs are kept; None: heads.DEFAULT_BRANCH


def default(name: str):
    """The default of one DumpSettings field, as the CLI shows it."""
    return next(f.default for f in fields(DumpSettings) if f.name == name)
