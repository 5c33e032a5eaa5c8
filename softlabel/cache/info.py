"""A store's self-description plus what is on disk: the content of `softlabel info`."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from softlabel.cache import store
from softlabel.cache.schema import Layout


KEPT_SAMPLE = 256  # samples of each view whose kept anchors info and verify count: a few kB of indices each


def kept_anchor_stats(group, layout: Layout, location: str, limit: int = KEPT_SAMPLE) -> dict[str, Any] | None:
    """Anchors a sparse store keeps per image, over the first `limit` samples of every finished view
    (None for a dense head, which keeps every anchor, and where the indices cannot be read: the checks
    that look for damage name it)."""
    if not layout.sparse:
        return None
    counts = []
    n = min(layout.count, limit)
    for view in layout.views:
        try:
            index = np.asarray(store.open_array(group, f"{view}/head/index", location)[:n])
        except Exception:  # a missing array or a chunk failing its checksum
            return None
        counts.append((index >= 0).sum(1))
    c = np.concatenate(counts)
    return {"samples": int(c.size), "mean": float(c.mean()), "min": int(c.min()), "max": int(c.max()),
            "none": float((c == 0).mean()), "cap": int(layout.sparse["topk"]), "floor": layout.sparse.get("floor")}


def render_kept(stats: dict[str, Any] | None, sparse: bool) -> str:
    if not sparse:
        return "every anchor (dense head)"
    if stats is None:
        return "the kept-anchor indices cannot be read: the store is damaged, 'softlabel verify' names what"
    return (f"{stats['mean']:.1f} per image on average (min {stats['min']}, max {stats['max']}; cap {stats['cap']}, "
            f"floor {stats['floor']}), {stats['none']:.0%} of images keep none; over {stats['samples']} sample-views")


def summarize(location: str) -> dict[str, Any]:
    attrs = store.read_attrs(location)
    layout = Layout.from_attrs(attrs)
    group = store.open_group(location, mode="r")
    flags = store.done_flags(group, layout)
    views = {}
    samples_done = 0
    for view, done in flags.items():
        n = sum(stop - start for s, (start, stop) in enumerate(map(layout.shard_range, range(layout.n_shards))) if done[s])
        samples_done += n
        views[view] = {"shards_done": int(done.sum()), "shards_total": layout.n_shards, "samples_done": n}
    complete = all(bool(d.all()) for d in flags.values())
    sizes = store.stored_bytes(group)
    per_tensor: dict[str, int] = defaultdict(int)
    for path, nbytes in sizes.items():
        head, _, rest = path.partition("/")
        if head in layout.views:
            per_tensor[rest] += nbytes
    totals = {kind: sum(v for k, v in per_tensor.items() if k.split("/")[0].split("_")[0] == kind) for kind in ("head", "feat")}
    return {
        "location": str(location),
        "schema_version": attrs["schema_version"],
        "softlabel_version": attrs.get("softlabel_version"),
        "created": attrs.get("created"),
        "teacher": attrs["teacher"],
        "data": attrs["data"],
        "augment": attrs["augment"],
        "storage": attrs["storage"],
        "views": views,
        "complete": complete,
        "kept_anchors": kept_anchor_stats(group, layout, location) if complete else None,
        "bytes_total": int(sum(sizes.values())),
        "bytes_per_sample_view": {k: (v / samples_done if samples_done else 0.0) for k, v in sorted(per_tensor.items())},
        "bytes_per_sample_view_total": {k: (v / samples_done if samples_done else 0.0) for k, v in totals.items()},
    }


def human_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def render(summary: dict[str, Any]) -> str:
    t, d, a, s = summary["teacher"], summary["data"], summary["augment"], summary["storage"]
    lines = [
        f"cache      {summary['location']}  (schema {summary['schema_version']}, softlabel {summary['softlabel_version']}, created {summary['created']})",
        f"teacher    {t['arch']}  nc={t['nc']}  strides={t['strides']}  reg_max={t['reg_max']}"
        + (f"  end-to-end, kept branch {t['branch']}" if t.get("branch") else "") + f"  sha256={t['sha256'][:12]}  {t['path']}",
        f"           feature channels {dict(zip(t['levels'], t['feature_channels']))}",
        f"data       {d['count']} images from {d['yaml']} ({d['split']}), list hash {d['images_hash'][:12]}"
        + (f", {len(d['skipped'])} skipped as Ultralytics skips them" if d.get("skipped") else ""),
        f"augment    imgsz={a['imgsz']} seed={a['seed']} views={a['views']} close_views={a['close_views']} "
        + " ".join(f"{k}={v}" for k, v in a.items() if k not in ("imgsz", "seed", "views", "close_views")),
        f"storage    {s.get('precision', s['dtype'])}{', boxes apart in ' + s['box_precision'] if s.get('box_precision') else ''}, codec head {s['codec']['head']['preset']} / feat {s['codec']['feat']['preset']}, "
        f"checksum {s['checksum']}, shard {s['shard_size']} samples, "
        f"head {'sparse: top ' + str(s['head_sparse']['topk']) + ' anchors, floor ' + str(s['head_sparse']['floor']) if s.get('head_sparse') else 'dense'}, "
        f"features {(s.get('feature_layout') or 'dense') + ' levels ' + ','.join(s['levels']) if s['features'] else 'off'}"
        + (f", rows for the first {s['head_sparse']['feature_rows']} kept anchors" if (s.get("head_sparse") or {}).get("feature_rows") else ""),
        "views      " + "  ".join(f"{v}: {x['shards_done']}/{x['shards_total']}" for v, x in summary["views"].items()),
        f"complete   {'yes' if summary['complete'] else 'no (run the same dump command again to resume)'}",
        *([f"kept       {render_kept(summary['kept_anchors'], bool(s.get('head_sparse')))}"] if summary["complete"] else []),
        f"on disk    {human_bytes(summary['bytes_total'])} in total; per sample-view:",
    ]
    for name, nbytes in summary["bytes_per_sample_view"].items():
        lines.append(f"           {name:<18} {human_bytes(nbytes)}")
    for name, nbytes in summary["bytes_per_sample_view_total"].items():
        lines.append(f"           {name + ' (all)':<18} {human_bytes(nbytes)}")
    return "\n".join(lines)
