"""A cache's root attributes parsed once into frozen dataclasses: what every reader of a store reads.

The attributes are JSON in the store (softlabel.cache.schema.build_attrs writes them); this module
is the one place that knows their keys. Everything else reads `CacheReader.description`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from softlabel.augment import AugmentConfig
from softlabel.errors import UserError


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher a store was dumped with, as recorded."""

    path: str
    sha256: str
    arch: str
    nc: int
    names: tuple[str, ...]
    strides: tuple[int, ...]
    reg_max: int
    levels: tuple[str, ...]
    feature_channels: tuple[int, ...]
    branches: tuple[str, ...]  # () for a one-branch head
    branch: str  # the branch whose outputs the store keeps ("" for a one-branch head)
    compute_dtype: str  # float16 (AMP on CUDA) or float32: the precision the dump's forward ran in

    def channels(self, level: str) -> int:
        return self.feature_channels[self.levels.index(level)]


@dataclass(frozen=True)
class DataRecord:
    yaml: str
    root: str
    split: str
    count: int
    images_hash: str
    skipped: tuple[str, ...] | None  # None for a store that predates the record
    nc: int | None
    names: tuple[str, ...]


@dataclass(frozen=True)
class AugmentRecord:
    imgsz: int
    seed: int
    views: int
    close_views: int
    config: AugmentConfig


@dataclass(frozen=True)
class SparseHead:
    topk: int
    floor: float
    feature_rows: int | None

    @property
    def rows(self) -> int:
        """F: the kept slots that have a feature row."""
        return int(self.feature_rows or self.topk)


@dataclass(frozen=True)
class StorageRecord:
    dtype: str
    precision: str
    codec: dict[str, Any]  # per tensor group (head, feat): the compression preset and its parameters
    checksum: str
    shard_size: int
    features: bool
    feature_layout: str | None  # "sparse" (rows at the kept anchors) or "dense" (whole maps); None without features
    levels: tuple[str, ...]  # the feature levels stored
    head_sparse: SparseHead | None  # None for a dense head
    box_precision: str | None = None  # a sparse head's box outputs apart at this precision; None: with the logits

    @property
    def feature_rows(self) -> bool:
        return self.features and self.feature_layout == "sparse"


@dataclass(frozen=True)
class CacheDescription:
    schema_version: int
    softlabel_version: str | None
    created: str | None
    command: tuple[str, ...] | None  # the dump command that writes and resumes it
    teacher: TeacherRecord
    data: DataRecord
    augment: AugmentRecord
    storage: StorageRecord

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str = "") -> "CacheDescription":
        try:
            return _parse(attrs)
        except (KeyError, TypeError, ValueError) as e:
            what = f"'{e.args[0]}'" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{where or 'cache'}: the root attributes are damaged or incomplete ({what} is missing "
                            "or malformed); re-dump it") from None


def _parse(attrs: dict[str, Any]) -> CacheDescription:
    t, d, a, s = attrs["teacher"], attrs["data"], attrs["augment"], attrs["storage"]
    sparse = s.get("head_sparse")
    command = attrs.get("command")
    return CacheDescription(
        schema_version=int(attrs["schema_version"]),
        softlabel_version=attrs.get("softlabel_version"),
        created=attrs.get("created"),
        command=tuple(str(c) for c in command) if command else None,
        teacher=TeacherRecord(
            path=str(t["path"]), sha256=str(t["sha256"]), arch=str(t["arch"]), nc=int(t["nc"]),
            names=tuple(str(n) for n in t["names"]), strides=tuple(int(x) for x in t["strides"]),
            reg_max=int(t["reg_max"]), levels=tuple(str(x) for x in t["levels"]),
            feature_channels=tuple(int(x) for x in t["feature_channels"]),
            branches=tuple(str(x) for x in t["branches"]), branch=str(t["branch"]),
            # a store that predates the record: assume the coarser precision
            compute_dtype=str(t.get("compute_dtype", "float16")),
        ),
        data=DataRecord(
            yaml=str(d["yaml"]), root=str(d.get("root", "")), split=str(d["split"]), count=int(d["count"]),
            images_hash=str(d["images_hash"]),
            skipped=tuple(str(x) for x in d["skipped"]) if "skipped" in d else None,
            nc=int(d["nc"]) if d.get("nc") is not None else None, names=tuple(str(n) for n in d.get("names") or ()),
        ),
        augment=AugmentRecord(
            imgsz=int(a["imgsz"]), seed=int(a["seed"]), views=int(a["views"]), close_views=int(a["close_views"]),
            config=AugmentConfig.from_attrs(a),
        ),
        storage=StorageRecord(
            dtype=str(s["dtype"]), precision=str(s.get("precision", "float16")), codec=dict(s["codec"]),
            checksum=str(s.get("checksum", "")), shard_size=int(s["shard_size"]), features=bool(s["features"]),
            feature_layout=s.get("feature_layout") or ("dense" if s["features"] else None),
            levels=tuple(str(x) for x in s["levels"]),
            head_sparse=SparseHead(int(sparse["topk"]), float(sparse["floor"]),
                                   int(sparse["feature_rows"]) if sparse.get("feature_rows") else None) if sparse else None,
            box_precision=str(s["box_precision"]) if s.get("box_precision") else None,
        ),
    )
