"""Is the cache still the teacher? Checksums of every chunk, then the live teacher on replayed samples."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from softlabel.anchors import level_ranges, map_sizes
from softlabel.cache import store
from softlabel.cache.info import kept_anchor_stats, render_kept
from softlabel.cache.presence import check_shard, shard_key
from softlabel.cache.description import TeacherRecord
from softlabel.cache.reader import CacheReader, MisplacedRecord
from softlabel.cache.schema import digest_path, fingerprint_path
from softlabel.data import build_index, load_data_yaml
from softlabel.errors import UserError
from softlabel.replay import Replay, View
from softlabel.teacher import Teacher, TeacherInfo, to_model_input


# (atol, rtol) per stored precision: a few units of rounding of that format
TOLERANCE = {"float16": (4e-3, 4e-3), "bfloat16": (8e-3, 1.6e-2), "int8": (4e-3, 4e-3), "float32": (1e-4, 1e-4)}
# (atol, rtol) added when the dump's or this check's teacher ran in float16 (autocast on CUDA): its
# activations round at 2**-11 relative in every layer, far coarser than a float32 forward
HALF_COMPUTE_TOLERANCE = (1e-2, 1e-2)


@dataclass
class TensorError:
    max_abs: float = 0.0
    max_rel: float = 0.0
    bad: int = 0  # samples beyond tolerance
    samples: list[str] = field(default_factory=list)  # which: "view v, sample i (path)"


@dataclass
class VerifyReport:
    shards_checked: int = 0  # shard objects whose index was read for presence
    missing: list[str] = field(default_factory=list)  # "tensor (view v) samples a-b: why"
    incomplete: dict[str, list[int]] = field(default_factory=dict)  # view -> shards the dump has not finished
    shards_total: int = 0  # per view
    resume: str = ""  # the command that finishes an incomplete store
    chunks_checked: int = 0
    corrupt: list[str] = field(default_factory=list)  # "view/tensor sample i: why"
    records_checked: int = 0  # records whose digest was recomputed
    misplaced: list[str] = field(default_factory=list)  # "view v, sample i (path), shard s": digest does not match
    attributes_checked: int = 0
    attributes: list[str] = field(default_factory=list)  # root attributes that contradict the store, data or teacher
    fingerprints_checked: int = 0
    fingerprint_mismatches: list[str] = field(default_factory=list)
    tensors: dict[str, TensorError] = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0
    compute: str = ""  # the teacher's precision in the dump and in this check
    kept: dict | None = None  # anchors a sparse store keeps per image (softlabel.cache.info.kept_anchor_stats)

    @property
    def ok(self) -> bool:
        return (
            not self.missing
            and not self.incomplete
            and not self.corrupt
            and not self.misplaced
            and not self.attributes
            and not self.fingerprint_mismatches
            and all(t.bad == 0 for t in self.tensors.values())
        )


def check_presence(reader: CacheReader, report: VerifyReport) -> None:
    """Every chunk of every finished shard is in the store: read from the shard indexes, not the data."""
    layout = reader.layout
    done = reader.done()
    fs, root = fsspec.core.url_to_fs(reader.location)
    root = root.rstrip("/")
    report.shards_total = layout.n_shards
    for view in layout.views:
        unfinished = [int(s) for s in np.flatnonzero(~done[view])]
        if unfinished:
            report.incomplete[view] = unfinished
        arrays = layout.per_sample(view)
        for shard in np.flatnonzero(done[view]):
            start, stop = layout.shard_range(int(shard))
            for name, spec in arrays.items():
                key = shard_key(name, int(shard), 1 + len(spec.shape))
                why = check_shard(fs, f"{root}/{key}", stop - start, layout.shard_size)
                report.shards_checked += 1
                if why:
                    tensor = name[len(view) + 1 :]
                    report.missing.append(f"{tensor} (view {view}) samples {start}-{stop - 1}, shard {shard}: {why}")
    paths = reader._array("samples/path")
    for k in range(-(-paths.shape[0] // paths.chunks[0])):
        if not fs.exists(f"{root}/samples/path/c/{k}"):
            report.missing.append(f"samples/path chunk {k}: missing")


def resume_command(recorded: tuple[str, ...] | None, location: str) -> str:
    """The dump's own command line, pointed at the store where it is now (it may have been moved)."""
    if not recorded:
        return "the same 'softlabel dump' command that wrote it"
    argv = list(recorded)
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(location)
    return shlex.join(argv)


def _spans(shards: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    out, start = [], None
    for a, b in zip(shards, [*shards[1:], None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out)


def scan_chunks(reader: CacheReader, report: VerifyReport) -> None:
    """Read every stored sample of every finished shard: the CRC32C codec rejects any altered byte, and
    each record's digest must bind it to its own view and sample (a moved or swapped shard passes CRC)."""
    done = reader.done()
    layout = reader.layout
    bar = tqdm(total=int(sum(d.sum() for d in done.values())), desc="verify: checksums and seals", unit="shard",
               disable=None, leave=False)  # drawn on a terminal only
    for view in layout.views:
        names = list(layout.per_sample(view))
        stored_names = [(name, name[len(view) + 1 :]) for name in layout.stored(view)]
        for shard in np.flatnonzero(done[view]):
            bar.update()
            start, stop = layout.shard_range(int(shard))
            rows: dict[str, list] = {}
            broken: set[int] = set()
            for name in names:
                arr = reader._array(name)
                try:
                    rows[name] = list(np.asarray(arr[start:stop]))
                    report.chunks_checked += stop - start
                    continue
                except Exception:
                    rows[name] = []
                for i in range(start, stop):  # find the sample(s) whose chunk fails
                    report.chunks_checked += 1
                    try:
                        rows[name].append(np.asarray(arr[i]))
                    except Exception as e:
                        rows[name].append(None)
                        broken.add(i)
                        report.corrupt.append(f"{name} {reader.sample_name(i)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            for i in range(start, stop):
                if i in broken:
                    continue
                r = i - start
                stored = {short: rows[name][r] for name, short in stored_names}
                why = reader.seal_error(view, i, stored, rows[fingerprint_path(view)][r].tobytes(),
                                        rows[digest_path(view)][r].tobytes())
                report.records_checked += 1
                if why:
                    report.misplaced.append(f"view {view}, {reader.sample_name(i)}, shard {shard}")
    bar.close()


def check_attributes(reader: CacheReader, report: VerifyReport, index, spec) -> None:
    """What the root attributes say against what the store, the data and the arrays hold."""
    desc, layout = reader.description, reader.layout
    data = desc.data
    paths = [str(p) for p in reader._array("samples/path")[:].tolist()]
    for what, stored, actual in (
        ("data.count vs samples/path", data.count, len(paths)),
        ("data.count vs the data's images", data.count, len(index)),
        ("data.nc vs the data", data.nc, spec.nc),
        ("data.names vs the data", list(data.names), list(spec.names)),
        ("teacher.names vs data.names", list(desc.teacher.names), list(data.names)),
        ("teacher.nc vs teacher.names", desc.teacher.nc, len(desc.teacher.names)),
    ):
        report.attributes_checked += 1
        if stored != actual:
            report.attributes.append(f"{what}: {_short(stored)} != {_short(actual)}")
    report.attributes_checked += 1
    if paths != index.relative_paths():
        first = next((i for i, (a, b) in enumerate(zip(paths, index.relative_paths())) if a != b), min(len(paths), len(index)))
        report.attributes.append(f"samples/path differs from the data's image list from sample {first}")
    for view in layout.views:
        for name, spec_ in layout.per_sample(view).items():
            report.attributes_checked += 1
            try:
                arr = reader._array(name)
            except UserError as e:
                report.missing.append(str(e).split(": ", 1)[-1])
                continue
            want = (layout.count, *spec_.shape)
            if tuple(arr.shape) != want or np.dtype(arr.dtype) != np.dtype(spec_.dtype):
                report.attributes.append(f"{name}: shape {tuple(arr.shape)} {arr.dtype}, the attributes describe {want} {spec_.dtype}")


def check_teacher_attributes(recorded: TeacherRecord, live: TeacherInfo, report: VerifyReport) -> None:
    """The store's description of its teacher against the teacher itself."""
    for key in ("arch", "nc", "names", "strides", "reg_max", "levels", "feature_channels", "branches", "branch"):
        report.attributes_checked += 1
        theirs = getattr(live, key)
        ours = getattr(recorded, key)
        if _plain(ours) != _plain(theirs):
            report.attributes.append(f"teacher.{key}: the store says {_short(_plain(ours))}, the teacher has {_short(_plain(theirs))}")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def pick_samples(views: list[str], count: int, n: int) -> list[tuple[str, int]]:
    """Spread the checked samples over every view and over the whole dataset."""
    per_view = min(n, -(-count // len(views)))  # a count past every sample of every view checks them all
    picks = []
    for k in range(min(per_view * len(views), count)):
        view = views[k % len(views)]
        picks.append((view, int((k // len(views)) * n / per_view)))
    return sorted(set(picks))


def run_verify(
    location: str,
    samples: int = 16,
    teacher: str | None = None,
    data: str | None = None,
    device: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
    scan: bool = True,
    half: bool | None = None,
) -> VerifyReport:
    """`half`: run the teacher in float16 (CUDA only); None runs it as the dump did."""
    from softlabel.dump import resolve_device

    reader = CacheReader(location)
    desc = reader.description
    precision = reader.layout.precision
    default_atol, default_rtol = TOLERANCE[precision]
    widen = atol is None, rtol is None  # only defaults grow for a float16 teacher; a given tolerance is taken as given
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    report = VerifyReport(atol=atol, rtol=rtol)
    check_presence(reader, report)
    if not report.incomplete:
        report.kept = kept_anchor_stats(store.open_group(location, mode="r"), reader.layout, location)
    if report.incomplete:
        report.resume = resume_command(desc.command, location)
    if scan:
        scan_chunks(reader, report)
    spec = load_data_yaml(data or desc.data.yaml)
    index = build_index(spec, desc.data.split, check_images=False)
    if index.list_hash() != desc.data.images_hash:
        raise UserError(f"{spec.yaml_path}: the images or labels differ from the ones the cache was dumped from")
    check_attributes(reader, report, index, spec)
    dumped = desc.teacher.compute_dtype
    # hashed before it is loaded: a file that is not the dump's teacher never gets to run
    t = Teacher.load(teacher or desc.teacher.path, device=resolve_device(device),
                     amp=dumped == "float16" if half is None else half, expect_sha256=desc.teacher.sha256,
                     branch=desc.teacher.branch or None)
    report.compute = f"teacher {dumped} in the dump, {t.compute_dtype} here"
    if "float16" in (dumped, t.compute_dtype):
        report.atol += HALF_COMPUTE_TOLERANCE[0] if widen[0] else 0.0
        report.rtol += HALF_COMPUTE_TOLERANCE[1] if widen[1] else 0.0
    check_teacher_attributes(desc.teacher, t.info, report)
    atol, rtol = report.atol, report.rtol
    aug = desc.augment
    replay = Replay(index, aug.config, aug.imgsz, aug.seed)
    done = reader.done()
    candidates = [(v, i) for v, i in pick_samples(reader.layout.views, samples, len(index)) if done[v][i // reader.layout.shard_size]]
    for view_key, i in tqdm(candidates, desc="verify: against the live teacher", unit="sample", disable=None, leave=False):
        s = replay(i, View.parse(view_key))
        report.fingerprints_checked += 1
        try:
            cached = reader.read(view_key, i)
        except MisplacedRecord:
            report.records_checked += 0 if scan else 1  # the scan has counted, and named, every record
            found = f"view {view_key}, {reader.sample_name(i)}, shard {i // reader.layout.shard_size}"
            if found not in report.misplaced:
                report.misplaced.append(found)
            continue
        except Exception as e:
            report.corrupt.append(f"{view_key} sample {i}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        report.records_checked += 0 if scan else 1
        if cached.fingerprint != s.fingerprint:
            report.fingerprint_mismatches.append(f"{view_key} sample {i} ({index.images[i].name})")
            continue
        out = t(to_model_input(torch.from_numpy(s.image[None]), t.device))
        for name, c, live, step in _pairs(reader, cached, out):
            diff = np.abs(c - live)
            limit = atol + rtol * np.abs(live)
            if precision == "int8":  # half a quantisation step of the value's channel
                limit = limit + 0.51 * step
            if diff.size == 0:
                continue
            err = report.tensors.setdefault(name, TensorError())
            err.max_abs = max(err.max_abs, float(diff.max()))
            err.max_rel = max(err.max_rel, float((diff / (np.abs(live) + 1e-3)).max()))
            if (diff > limit).any():
                err.bad += 1
                err.samples.append(f"view {view_key}, {reader.sample_name(i)}")
    return report


def _pairs(reader: CacheReader, cached, out) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | float]]:
    """(tensor name, cached values, live values, int8 step) to compare: every value of a dense store;
    a sparse store's kept anchors (head values and feature rows), where it holds the teacher's own numbers."""
    levels = reader.levels
    live_head = [h[0].float().cpu().numpy() for h in out.head]
    live_feat = {lvl: f[0].float().cpu().numpy() for lvl, f in zip(levels, out.feat)}
    pairs = []
    if cached.sparse:
        dense = np.concatenate([h.reshape(h.shape[0], -1) for h in live_head], 1)  # [C, A]
        keep = cached.index >= 0
        if keep.any():  # an image whose anchors all score below the floor keeps none
            anchors = cached.index[keep].astype(np.int64)
            live = dense[:, anchors].T  # [k, C]
            # the int8 step from the live values, as the dump scaled them: a damaged stored scale cannot widen it
            pairs.append(("head/values", cached.head_values()[keep], live, np.abs(live).max(axis=0, keepdims=True) / 127))
    else:
        for lvl, h, (start, end) in zip(levels, live_head, level_ranges(map_sizes(live_head))):
            c = cached.head[:, start:end].reshape(h.shape)
            pairs.append((f"head/{lvl}", c.astype(np.float32), h, np.abs(h).max(axis=(1, 2), keepdims=True) / 127))
    if cached.rows is not None:
        index = cached.index[: len(cached.rows)]  # rows cover the first F slots
        row_level = reader.anchor_levels()[np.maximum(index, 0)]
        row_level = np.where(index >= 0, row_level, -1)
        rows = cached.row_values(row_level)
        feat_levels = reader.feature_levels
        for lvl, (start, end) in zip(levels, level_ranges(map_sizes(live_head))):
            inside = (index >= start) & (index < end)
            if lvl in live_feat and lvl in feat_levels and inside.any():
                f = live_feat[lvl].reshape(live_feat[lvl].shape[0], -1)  # [C, H*W]
                live = f[:, index[inside] - start].T  # [k, C]
                step = np.abs(live).max(axis=0, keepdims=True) / 127
                pairs.append((f"feat/rows/{lvl}", rows[inside, : f.shape[0]], live, step))
    else:
        for lvl in cached.feat:
            live = live_feat[lvl]
            pairs.append((f"feat/{lvl}", cached.feat_map(lvl), live, np.abs(live).max(axis=(1, 2), keepdims=True) / 127))
    return pairs


def render(report: VerifyReport) -> str:
    lines = []
    if report.incomplete:
        lines.append(f"complete      NO: the dump has not finished ({report.shards_total} shards per view)")
        lines += [f"  unfinished  view {v}: shards {_spans(s)}" for v, s in report.incomplete.items()]
        lines.append(f"  resume with {report.resume}")
    else:
        lines.append("complete      yes, every shard of every view is done")
    lines += [
        *([f"kept          {render_kept(report.kept, True)}"] if report.kept is not None else []),
        f"presence      {report.shards_checked} shard indexes read, {len(report.missing)} with missing data",
        *(f"  missing     {m}" for m in report.missing),
        f"checksums     {report.chunks_checked} sample chunks read, {len(report.corrupt)} corrupt",
        *(f"  corrupt     {c}" for c in report.corrupt),
        f"records       {report.records_checked} digests recomputed, {len(report.misplaced)} not of their view and sample "
        "(moved, swapped or stale)",
        *(f"  misplaced   {m}" for m in report.misplaced),
        f"attributes    {report.attributes_checked} checked, {len(report.attributes)} contradicted",
        *(f"  contradicts {a}" for a in report.attributes),
        f"fingerprints  {report.fingerprints_checked - len(report.fingerprint_mismatches)}/{report.fingerprints_checked} match",
        *(f"  mismatch    {m}" for m in report.fingerprint_mismatches),
        f"{'tensor':<12}{'max abs err':>14}{'max rel err':>14}  status (tolerance {report.atol:g} + {report.rtol:g}*|x|; {report.compute})",
    ]
    for name, e in sorted(report.tensors.items()):
        lines.append(f"{name:<12}{e.max_abs:>14.3e}{e.max_rel:>14.3e}  {'ok' if e.bad == 0 else f'{e.bad} samples beyond tolerance'}")
        lines += [f"  beyond      {name}: {where}" for where in e.samples]
    if report.ok:
        lines.append("verify: OK")
    else:
        why = [w for w, bad in (("incomplete", report.incomplete), ("missing data", report.missing), ("corrupt chunks", report.corrupt),
                                ("misplaced records", report.misplaced), ("contradicting attributes", report.attributes),
                                ("fingerprint mismatches", report.fingerprint_mismatches),
                                ("values beyond tolerance", any(t.bad for t in report.tensors.values()))) if bad]
        lines.append(f"verify: FAILED ({', '.join(why)})")
    return "\n".join(lines)
