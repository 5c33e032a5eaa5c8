"""Phase one: replayed inputs -> teacher -> cache writer, resumable shard by shard."""

from __future__ import annotations

import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import softlabel
from softlabel.augment import load_augment
from softlabel.cache import store
from softlabel.cache.codecs import codec_choice
from softlabel.cache.info import human_bytes
from softlabel.cache.encoding import PRECISIONS, stored_dtype
from softlabel.cache.lock import DumpLock
from softlabel.cache.schema import FEATURE_LAYOUTS, Layout, build_attrs, settings_diff
from softlabel.cache.writer import CacheWriter
from softlabel.checks import check_class_names, check_out_outside_data
from softlabel.data import build_index, load_data_yaml
from softlabel.errors import UserError
from softlabel.replay import Replay, View, all_views
from softlabel.select import to_host
from softlabel.teacher import Teacher, to_model_input
from softlabel.teacherformat import HeadFormat
from softlabel.dumpsettings import DEFAULT_FEATURE_ROWS, DEFAULT_HEAD_FLOOR, DEFAULT_HEAD_TOPK, FEW_KEPT, SAME, DumpSettings, store_defaults  # noqa: F401 (re-exported)


@dataclass
class DumpResult:
    out: str
    samples_done: int
    shards_written: int
    skipped_shards: int
    views: list[str] = field(default_factory=list)
    host_bytes: int = 0  # bytes copied from the teacher's device to the host, every batch run
    host_samples: int = 0  # sample-views those batches held
    disk_bytes: int = 0  # what the shards this run wrote take on disk (compressed, with their indexes)

    @property
    def host_bytes_per_sample_view(self) -> float:
        return self.host_bytes / self.host_samples if self.host_samples else 0.0


def resolve_device(device: str) -> torch.device:
    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return torch.device("cpu")
    if d.isdigit() or d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for, but CUDA is not available on this machine; use --device cpu")
        return torch.device(f"cuda:{d}" if d.isdigit() else d)
    if d == "mps":
        return torch.device("mps")
    raise UserError(f"unknown device '{device}' (use cpu, 0, 1, ... or cuda:N)")


class _ReplayItems(Dataset):
    """(view, index) items replayed in whichever process the DataLoader puts them."""

    def __init__(self, replay: Replay, items: list[tuple[View, int]]):
        self.replay = replay
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        view, i = self.items[j]
        s = self.replay(i, view)
        return view.key, i, s.image, s.fingerprint


def _collate(batch):
    views, indices, images, fps = zip(*batch)
    return list(views), list(indices), torch.from_numpy(np.stack(images)), list(fps)


def owned(shard: int, rank: int, world: int) -> bool:
    """Rank r owns every world-th shard: whole shards, so no two processes write one shard object."""
    return shard % world == rank


def plan_batches(
    layout: Layout, done: dict[str, np.ndarray], batch: int, views: list[View], rank: int = 0, world: int = 1
) -> tuple[list[tuple[View, int]], list[list[int]]]:
    """Batches are fixed slices [b*batch, (b+1)*batch) of each view, so a resumed or multi-rank run
    feeds the teacher exactly the batches an uninterrupted single run would; a batch runs if it
    touches a shard that this rank owns and that is not done."""
    items: list[tuple[View, int]] = []
    batches: list[list[int]] = []
    s = layout.shard_size
    for view in views:
        flags = done[view.key]
        for start in range(0, layout.count, batch):
            stop = min(start + batch, layout.count)
            shards = range(start // s, (stop - 1) // s + 1)
            if not any(owned(sh, rank, world) and not flags[sh] for sh in shards):
                continue
            batches.append(list(range(len(items), len(items) + stop - start)))
            items.extend((view, i) for i in range(start, stop))
    return items, batches


def _dump_attrs(settings: DumpSettings, teacher_info, spec, index, augment, levels) -> dict:
    teacher = teacher_info.to_dict()
    data = {
        "yaml": str(spec.yaml_path),
        "root": str(spec.root),
        "split": "train",
        "count": len(index),
        "images_hash": index.list_hash(),
        "skipped": index.skipped_names(),  # what Ultralytics would not train on either
        "nc": spec.nc,
        "names": list(spec.names),
    }
    aug = {**augment.to_dict(), "seed": settings.seed, "imgsz": settings.imgsz, "views": settings.views, "close_views": settings.close_views}
    storage = {
        "dtype": stored_dtype(settings.precision),
        "precision": settings.precision,
        "codec": codec_choice(settings.codec),
        "checksum": "crc32c",
        "quantisation": "int8 symmetric, one float32 scale per sample and channel" if settings.precision == "int8" else None,
        "head_sparse": {"topk": settings.head_topk, "floor": settings.head_floor, "feature_rows": settings.feature_rows}
        if settings.head_topk else None,
        "shard_size": settings.shard_size,
        "features": settings.features,
        "feature_layout": settings.feature_layout if settings.features else None,
        "levels": levels if settings.features else [],
    }
    if settings.box_precision:  # only when apart: a store from before the option resumes with the same settings
        storage["box_precision"] = settings.box_precision
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    attrs = build_attrs(teacher, data, aug, storage, softlabel.__version__, created)
    attrs["command"] = dump_command(settings, teacher["path"], str(spec.yaml_path))
    return attrs


def dump_command(settings: DumpSettings, teacher: str, data: str) -> list[str]:
    """The command line that writes (and resumes) this store, with absolute paths, for messages that say how to finish it."""
    out = store.local_path(settings.out)
    args = ["softlabel", "dump", "--teacher", teacher, "--data", data, "--out", out.absolute() if out else settings.out,
            "--views", settings.views, "--close-views", settings.close_views, "--imgsz", settings.imgsz,
            "--batch", settings.batch, "--device", settings.device, "--seed", settings.seed,
            "--precision", settings.precision, "--head-topk", settings.head_topk or 0, "--shard-size", settings.shard_size,
            "--codec", settings.codec]
    if settings.head_topk:  # always given: an absent floor would resume with the default one
        args += ["--head-floor", settings.head_floor, "--box-precision", settings.box_precision or SAME]
    if settings.branch:
        args += ["--teacher-branch", settings.branch]
    if settings.augment:
        augment = Path(settings.augment)
        args += ["--augment", str(augment.absolute()) if augment.is_file() else settings.augment]
    if settings.levels:
        args += ["--levels", ",".join(settings.levels)]
    if not settings.features:
        args.append("--no-features")
    else:
        args += ["--features", settings.feature_layout]
        if settings.feature_rows:
            args += ["--feature-rows", settings.feature_rows]
    return [str(a) for a in args]


def sparse_features(settings: DumpSettings) -> bool:
    return settings.features and settings.feature_layout == "sparse"


def resolve_head(settings: DumpSettings, reg_max: int) -> DumpSettings:
    """Turn the storage defaults into what gets stored for a teacher head with this reg_max: its box form's
    precision, topk None for a dense head, a floor number, the feature rows' count for sparse features (None otherwise)."""
    defaults = store_defaults(reg_max)
    settings.precision = settings.precision or defaults.precision
    settings.head_topk = (defaults.topk if settings.head_topk is None else settings.head_topk) or None
    box = defaults.box_precision if settings.box_precision is None else settings.box_precision
    settings.box_precision = None if box == SAME or not settings.head_topk else box
    if settings.head_floor is None:
        settings.head_floor = defaults.floor if settings.head_topk else 0.0
    if not (settings.head_topk and sparse_features(settings)):
        settings.feature_rows = None
    elif settings.feature_rows is None:
        settings.feature_rows = min(DEFAULT_FEATURE_ROWS, settings.head_topk)
    return settings


def _check_feature_rows(settings: DumpSettings) -> None:
    """1 <= --feature-rows <= --head-topk, where the cap is known (given, or resolved for the teacher's head)."""
    if settings.feature_rows < 1 or settings.head_topk and settings.feature_rows > settings.head_topk:
        raise UserError(f"--feature-rows {settings.feature_rows}: must be between 1 and --head-topk ({settings.head_topk})")


def prepare(settings: DumpSettings):
    """Everything that can fail on bad input, before the store is touched."""
    if settings.views < 1:
        raise UserError("--views must be at least 1")
    if settings.close_views < 0:
        raise UserError("--close-views must be 0 or more")
    if settings.batch < 1:
        raise UserError(f"--batch {settings.batch}: must be at least 1")
    if settings.shard_size < 1:
        raise UserError(f"--shard-size {settings.shard_size}: must be at least 1")
    if settings.workers < 0:
        raise UserError(f"--workers {settings.workers}: must be 0 (replay in the main process) or more")
    if settings.imgsz < 32 or settings.imgsz % 32:
        raise UserError(f"--imgsz {settings.imgsz}: must be a positive multiple of 32")
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise UserError(f"--precision {settings.precision}: valid precisions are {', '.join(PRECISIONS)}")
    if settings.box_precision is not None and settings.box_precision not in (*PRECISIONS, SAME):
        raise UserError(f"--box-precision {settings.box_precision}: valid precisions are {', '.join((*PRECISIONS, SAME))}")
    if settings.head_topk is not None and settings.head_topk < 0:
        raise UserError("--head-topk must be 0 (a dense head, every anchor) or more")
    if settings.head_floor is not None and not 0.0 <= settings.head_floor < 1.0:
        raise UserError("--head-floor is a score in [0, 1)")
    if settings.head_floor and settings.head_topk == 0:
        raise UserError("--head-floor needs a sparse head (--head-topk K, K > 0)")
    if settings.feature_layout not in FEATURE_LAYOUTS:
        raise UserError(f"--features {settings.feature_layout}: valid layouts are {', '.join(FEATURE_LAYOUTS)}")
    if settings.features and settings.feature_layout == "sparse" and settings.head_topk == 0:
        raise UserError(
            "--head-topk 0 stores a dense head, but sparse features are kept at the sparse head's anchors; "
            "give --features dense (whole feature maps), --no-features, or a --head-topk K > 0"
        )
    if settings.feature_rows is not None:
        if not sparse_features(settings):
            raise UserError("--feature-rows applies to sparse features (--features sparse) only")
        _check_feature_rows(settings)  # against a --head-topk given; the default cap is checked once the head is known
    codec_choice(settings.codec)
    settings.out = store.resolve_link(settings.out)
    store.require_writable(settings.out, settings.overwrite)
    spec = load_data_yaml(settings.data)
    augment = load_augment(settings.augment)
    device = resolve_device(settings.device)
    teacher = Teacher.load(settings.teacher, device=device, amp=settings.half, branch=settings.branch)
    info = teacher.info
    resolve_head(settings, info.reg_max)
    if settings.feature_rows:
        _check_feature_rows(settings)
    check_class_names(info.names, list(spec.names), settings.teacher, spec.yaml_path)
    levels = list(settings.levels) if settings.levels else list(info.levels)
    unknown = [lvl for lvl in levels if lvl not in info.levels]
    if unknown:
        raise UserError(f"--levels {','.join(unknown)}: the teacher has levels {','.join(info.levels)}")
    levels = [lvl for lvl in info.levels if lvl in levels]  # teacher order
    if settings.imgsz % max(info.strides):
        raise UserError(f"--imgsz {settings.imgsz} must be a multiple of the teacher's largest stride {max(info.strides)}")
    index = build_index(spec, "train", strict=settings.strict)
    check_out_outside_data(settings.out, index)
    attrs = _dump_attrs(settings, info, spec, index, augment, levels)
    attrs["teacher"]["compute_dtype"] = teacher.compute_dtype  # verify's tolerance depends on it
    replay = Replay(index, augment, settings.imgsz, settings.seed)
    return teacher, replay, attrs


def open_for_dump(out: str, attrs: dict, overwrite: bool, sample_paths: list[str]):
    """Create the store, or reopen it for a resume after checking that every setting matches."""
    layout = Layout.from_attrs(attrs)
    if store.require_writable(out, overwrite).kind == "store":
        half_made = bool(dict(store.open_group(out).attrs).get("creating"))  # a crash during creation
        if overwrite or half_made:
            store.remove(out)
        else:
            stored = store.read_attrs(out)
            diffs = settings_diff(stored, attrs)
            if diffs:
                raise UserError(f"{out}: the store was written with other settings: {'; '.join(diffs)} (--overwrite starts over)")
            group = store.open_group(out, mode="r+")
            store.ensure_arrays(group, stored, layout)
            return group, layout
    return store.create(out, attrs, layout, sample_paths), layout


def warn_few_kept(counts: np.ndarray, layout: Layout, bar) -> None:
    """One warning line when a typical image keeps fewer than FEW_KEPT anchors."""
    if counts.mean() >= FEW_KEPT:
        return
    floor, cap = layout.sparse.get("floor"), layout.sparse["topk"]
    bar.write(
        f"softlabel: warning: the teacher keeps {counts.mean():.1f} anchors per image on average (min {counts.min()}, "
        f"max {counts.max()}) above --head-floor {floor} in its first {len(counts)} images; the class, box and feature "
        f"terms read the kept anchors and will be near zero. Use a better-trained teacher, or a lower --head-floor "
        f"(0 keeps the top {cap} of every image)", file=sys.stderr)


def _ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain run."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _agree(error: str | None, world: int) -> str | None:
    """Rank 0's verdict on the store reaches every rank, so no rank waits for a job that stopped."""
    if world == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_dump(settings: DumpSettings) -> DumpResult:
    rank, world, local_rank = _ranks()
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")  # only small control messages travel between ranks
        if settings.device not in ("", "cpu") and "," not in settings.device:
            settings.device = str(local_rank)  # one GPU per rank
    teacher, replay, attrs = prepare(settings)
    lock, error = None, None
    if rank == 0:
        try:
            lock = DumpLock(settings.out).acquire()
            open_for_dump(settings.out, attrs, settings.overwrite, replay.index.relative_paths())
        except UserError as e:
            error = str(e)
            if lock is not None:
                lock.release()
    error = _agree(error, world)
    if error:
        raise UserError(error)
    try:
        return _dump_owned(settings, teacher, replay, attrs, rank, world)
    finally:
        if world > 1:
            dist.barrier()
        if lock is not None:
            lock.release()


def _dump_owned(settings: DumpSettings, teacher, replay, attrs, rank: int, world: int) -> DumpResult:
    layout = Layout.from_attrs(attrs)
    group = store.open_group(settings.out, mode="r+")
    views = all_views(settings.views, settings.close_views)
    done = store.done_flags(group, layout)
    items, batches = plan_batches(layout, done, settings.batch, views, rank, world)
    skipped = sum(int(d.sum()) for d in done.values())
    loader = DataLoader(
        _ReplayItems(replay, items),
        batch_sampler=batches,
        num_workers=settings.workers,
        collate_fn=_collate,
        pin_memory=teacher.device.type == "cuda",
        prefetch_factor=4 if settings.workers else None,
    )
    writer = CacheWriter(group, layout, settings.out)
    desc = f"dump {Path(settings.out).name}" + (f" rank {rank}/{world}" if world > 1 else "")
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=not settings.progress, dynamic_ncols=True, position=rank)
    written, host_bytes, host_samples = 0, 0, 0
    first = bool(layout.sparse)
    fmt = HeadFormat.of(layout)
    try:
        for view_keys, indices, images, fps in loader:
            out = teacher(to_model_input(images, teacher.device))
            # selected and quantised where the teacher ran: only the stored arrays cross to the host
            stored, copied = to_host(fmt.encode(out.head, out.feat), fmt.row_spans(out.head))
            if first:
                warn_few_kept((stored["head/index"] >= 0).sum(1), layout, bar)
                first = False
            host_bytes += copied
            host_samples += len(indices)
            for b, (view, i) in enumerate(zip(view_keys, indices)):
                shard = i // layout.shard_size
                if done[view][shard] or not owned(shard, rank, world):
                    continue  # a batch straddling a finished or another rank's shard
                tensors = {f"{view}/{name}": a[b] for name, a in stored.items()}
                writer.add(view, i, tensors, fps[b])
                written += 1
            bar.update(len(indices))
            bar.set_postfix_str(f"{human_bytes(writer.disk_bytes)} of shards on disk", refresh=False)
    except BaseException:
        writer.abort()  # shards already complete still land; the rest resume next time
        raise
    else:
        writer.close()
        bar.set_postfix_str(f"{human_bytes(writer.disk_bytes)} of shards on disk")  # the last shards land after the loop
    finally:
        bar.close()
    return DumpResult(settings.out, written, writer.shards_written, skipped, [v.key for v in views], host_bytes, host_samples,
                      writer.disk_bytes)
