"""The cache's self-description: root attributes, array layout, and what must match to reuse a store.

Layout (zarr v3), schema 5:
    samples/path            [N]                       image paths relative to the dataset root
    {view}/fingerprint      [N, 16] uint8             softlabel.replay.fingerprint of the replayed image and labels
    {view}/digest           [N, 4] uint8              softlabel.cache.digest.record_digest: binds the record's
                                                      tensors and fingerprint to its view and sample
  sparse head (default, K = head_sparse.topk):
    {view}/head/index       [N, K] int32              kept anchors (P3..P5 row-major) best first, -1 for an unused slot
    {view}/head/values      [N, K, 4*reg_max+nc]      their box outputs (DFL bins, or 4 distances) and class logits
    {view}/head/scale       [N, 4*reg_max+nc] float32 int8 only
    {view}/head/background  [N, nc] float16           the class logit of every other anchor
    with the box outputs apart (storage.box_precision; a distance head's default, float32):
    {view}/head/values      [N, K, nc]                the class logits only (head/scale [N, nc] for int8)
    {view}/head/boxes       [N, K, 4*reg_max]         the box outputs at box_precision (head/box_scale [N, 4*reg_max] for int8)
  dense head (--head-topk 0):
    {view}/head/{level}     [N, 4*reg_max+nc, H, W]   with head_scale/{level} [N, 4*reg_max+nc] (int8)
  sparse features (default, needs a sparse head; storage.feature_layout "sparse"; F = head_sparse.feature_rows <= K):
    {view}/feat/rows        [N, F, Cmax]              row j < F: the feature vector of anchor index[j] at its
                                                      own level, zero past that level's C (Cmax: widest level)
                                                      and where slot j is unused
    {view}/feat/scale       [N, L, Cmax] float32      int8 only: per stored level and channel, over its rows
  dense features (--features dense):
    {view}/feat/{level}     [N, C, H, W]              with feat_scale/{level} [N, C] (int8)
    {view}/done             [N/S] uint8               1 once every array of that shard is durable
with view = v{k} (mosaic views) and c{m} (closing views); shard = S consecutive samples; values and
rows are int8 (a DFL head's default), float16 (a distance head's default), bfloat16 (its raw bits as uint16)
or float32.

Schema 6 describes the teacher's head (its branches, the branch kept, box outputs of any reg_max, 1 for
distances); schema 5 seals every record with its digest; schema 4 stores feature rows for the first F kept anchors only (all K before); schema 3 changed
what a view holds, not its arrays: mosaic partners come from the image's partner group
(augment.mosaic_group) and the fingerprint is four CRC-32C; schema 2 stored features at the kept
anchors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from softlabel.errors import UserError

FORMAT = "softlabel-cache"
SCHEMA_VERSION = 6
FEATURE_LAYOUTS = ("sparse", "dense")

# Attributes that describe a run but do not change what a store holds: they may differ on resume.
_VOLATILE = {"teacher.path", "data.yaml", "data.root", "created", "softlabel_version", "storage.writer", "command"}


@dataclass(frozen=True)
class ArraySpec:
    """One stored array of a view: per-sample shape, dtype, and which codec group compresses it."""

    shape: tuple[int, ...]
    dtype: str
    codec: str  # "head", "feat" (the configured presets) or "raw" (checksum only)


@dataclass(frozen=True)
class Layout:
    """The shapes of one sample's tensors, how they are stored, and how samples group into shards."""

    count: int
    shard_size: int
    head: dict[str, tuple[int, int, int]]  # level -> (channels, H, W), as the teacher outputs it
    feat: dict[str, tuple[int, int, int]]
    views: list[str]
    reg_max: int = 16
    nc: int = 80
    precision: str = "float16"
    sparse: dict | None = None  # {"topk": K, "floor": F, "feature_rows": R} for a sparse head
    # a sparse head's box outputs in an array of their own at this precision (None: beside the class logits, at
    # `precision`): a distance head's distances in float32, since any rounding moves a distance across the
    # student's and flips the sign of that side's IoU or L1 gradient
    box_precision: str | None = None
    feature_layout: str = "dense"  # "sparse": feature rows at the kept anchors; "dense": whole maps

    @property
    def n_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    @property
    def anchors(self) -> int:
        return sum(h * w for _, h, w in self.head.values())

    @property
    def feature_rows(self) -> bool:
        """Features stored as rows at the sparse head's kept anchors."""
        return bool(self.feat) and self.feature_layout == "sparse"

    @property
    def row_count(self) -> int:
        """F: the kept-anchor slots that have a feature row, the first F of the head's K."""
        return int(self.sparse.get("feature_rows") or self.sparse["topk"])

    @property
    def row_width(self) -> int:
        """Cmax: the widest stored feature level; narrower levels' rows are zero-padded to it."""
        return max(c for c, _, _ in self.feat.values())

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.count)

    def stored(self, view: str) -> dict[str, ArraySpec]:
        """Every per-sample array of a view as it is on disk, as the teacher-output format declares it."""
        from softlabel.teacherformat import HeadFormat

        return HeadFormat.of(self).arrays(view)

    def per_sample(self, view: str) -> dict[str, ArraySpec]:
        """Every array of a view with one entry per sample: the stored tensors, the fingerprint and the digest."""
        from softlabel.cache.digest import DIGEST_BYTES
        from softlabel.replay import FINGERPRINT_BYTES

        return {
            **self.stored(view),
            fingerprint_path(view): ArraySpec((FINGERPRINT_BYTES,), "uint8", "raw"),
            digest_path(view): ArraySpec((DIGEST_BYTES,), "uint8", "raw"),
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Layout":
        from softlabel.cache.description import CacheDescription

        return cls.from_description(CacheDescription.from_attrs(attrs))

    @classmethod
    def from_description(cls, desc) -> "Layout":
        t, a, s = desc.teacher, desc.augment, desc.storage
        sizes = {lvl: (a.imgsz // st, a.imgsz // st) for lvl, st in zip(t.levels, t.strides)}
        head = {lvl: (4 * t.reg_max + t.nc, *sizes[lvl]) for lvl in t.levels}
        feat = {lvl: (t.channels(lvl), *sizes[lvl]) for lvl in s.levels} if s.features else {}
        views = [f"v{k}" for k in range(a.views)] + [f"c{m}" for m in range(a.close_views)]
        sparse = s.head_sparse
        return cls(
            count=desc.data.count,
            shard_size=s.shard_size,
            head=head,
            feat=feat,
            views=views,
            reg_max=t.reg_max,
            nc=t.nc,
            precision=s.precision,
            sparse={"topk": sparse.topk, "floor": sparse.floor, "feature_rows": sparse.feature_rows} if sparse else None,
            feature_layout=s.feature_layout or "dense",
            box_precision=s.box_precision if sparse else None,
        )


def head_path(view: str, level: str) -> str:
    return f"{view}/head/{level}"


def feat_path(view: str, level: str) -> str:
    return f"{view}/feat/{level}"


def fingerprint_path(view: str) -> str:
    return f"{view}/fingerprint"


def digest_path(view: str) -> str:
    return f"{view}/digest"


def done_path(view: str) -> str:
    return f"{view}/done"


def build_attrs(teacher: dict, data: dict, augment: dict, storage: dict, version: str, created: str) -> dict:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "softlabel_version": version,
        "created": created,
        "teacher": teacher,
        "data": data,
        "augment": augment,
        "storage": storage,
    }


def check_format(attrs: dict[str, Any], where: str) -> None:
    """Refuse a store that is not a softlabel cache, or one written by an older or newer schema."""
    if attrs.get("format") != FORMAT:
        raise UserError(f"{where}: not a softlabel cache (no '{FORMAT}' format attribute)")
    version = attrs.get("schema_version")
    if isinstance(version, int) and version < SCHEMA_VERSION:
        raise UserError(
            f"{where}: written by an older softlabel (cache schema {version}; this softlabel reads schema "
            f"{SCHEMA_VERSION}, which describes every detector family's head and seals each record to its sample and view); "
            "re-dump it with 'softlabel dump' (--overwrite replaces it)"
        )
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(
            f"{where}: cache schema version {version} is newer than this softlabel reads ({SCHEMA_VERSION}); "
            "upgrade softlabel"
        )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def settings_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Each setting that differs, as 'key: stored -> wanted', ignoring ones that do not change content."""
    a, b = _flatten(stored), _flatten(wanted)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in _VOLATILE or key.split(".")[0] in _VOLATILE:
            continue
        if _normal(a.get(key, "<absent>")) != _normal(b.get(key, "<absent>")):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def _normal(v: Any) -> Any:
    # JSON turns tuples into lists; compare values, not container types
    return list(v) if isinstance(v, tuple) else v
