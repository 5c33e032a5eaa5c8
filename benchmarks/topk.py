"""How many anchors a sparse store must keep at 640 px: the distillation-loss error of each K.

A sparse head keeps each image's K most confident anchors (DFL bins and class logits) and one
background logit per class for the rest; sparse features keep the neck vector at those anchors.
At 640 px an image has 8,400 anchors, so K = 64 keeps 0.8% of them. This measures, for each
candidate K and for a score-floor rule with a cap, the error of the distillation loss (the default
config, every term) computed from the store against the same loss from the live teacher's dense
float32 outputs, on the same replayed samples and the same fixed student (storage.py's fidelity).

Use a teacher trained for the data: a random teacher's flat confidences make every K look wrong.
The data should look like the operating point: 640 px scenes with COCO's density (`--build-data`
draws handwritten-digit scenes with about 7 objects per image, a long tail, objects 10-400 px).

The default is the smallest K (or rule) whose loss error stays within 1% (`LOSS_LIMIT`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import common
import numpy as np

from storage import LOSS_LIMIT, _fidelity, _subset

# name -> (head_topk, head_floor); every candidate is int8 with sparse features, as the default store
CANDIDATES = {
    "top64": (64, 0.0),
    "top128": (128, 0.0),
    "top256": (256, 0.0),
    "top512": (512, 0.0),
    "floor.01-cap512": (512, 0.01),
    "floor.05-cap512": (512, 0.05),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt) trained for --data")
    p.add_argument("--data", required=True, help="data.yaml of the scenes (see --build-data)")
    p.add_argument("--imgsz", type=int, default=640, help="image size of the dumps (default: 640)")
    p.add_argument("--images", type=int, default=64, help="training images dumped per candidate (default: 64)")
    p.add_argument("--fidelity-samples", type=int, default=64, help="samples the loss is compared on (default: 64)")
    p.add_argument("--augment", default=None, help="augmentation YAML of the dumps (default: the built-in default)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of: " + ", ".join(CANDIDATES))
    p.add_argument("--batch", type=int, default=8, help="dump batch (default: 8)")
    p.add_argument("--out", default=str(common.RESULTS / "topk.json"), help="result JSON (default: benchmarks/results/topk.json)")
    return p.parse_args()


def kept_anchors(store: str) -> dict:
    """Anchors the sparse head kept per sample-view: mean, min and max over the store."""
    import zarr

    group = zarr.open_group(store, mode="r")
    index = np.asarray(group["v0/head/index"][:])
    kept = (index >= 0).sum(1)
    return {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max())}


def main() -> None:
    args = parse_args()
    from softlabel.cache.info import summarize
    from softlabel.dump import DumpSettings, run_dump
    from softlabel.teacher import load_model

    _, info_t = load_model(args.teacher)
    anchors = sum((args.imgsz // s) ** 2 for s in info_t.strides)
    work = Path(tempfile.mkdtemp(prefix="softlabel-topk-"))
    results, rows = {}, []
    try:
        subset = _subset(Path(args.data), args.images, work)
        for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
            topk, floor = CANDIDATES[name]
            out = str(work / f"{name}.zarr")
            t = time.perf_counter()
            run_dump(DumpSettings(teacher=args.teacher, data=str(subset), out=out, views=1, close_views=0, imgsz=args.imgsz,
                                  batch=args.batch, workers=1, progress=False, augment=args.augment, precision="int8",
                                  head_topk=topk, head_floor=floor))
            seconds = time.perf_counter() - t
            totals = summarize(out)["bytes_per_sample_view_total"]
            kept = kept_anchors(out)
            fidelity = _fidelity(out, Path(args.teacher), subset, None, args.fidelity_samples)
            results[name] = {"head_topk": topk, "head_floor": floor, "kept_anchors": kept,
                             "kept_share": kept["mean"] / anchors, "head_bytes_per_sample_view": totals["head"],
                             "feat_bytes_per_sample_view": totals["feat"], "loss_rel_error": fidelity["total"]["max"],
                             "loss_rel_error_per_term": fidelity, "dump_seconds": seconds}
            shutil.rmtree(out, ignore_errors=True)
            rows.append([name, kept["mean"], 100 * kept["mean"] / anchors, (totals["head"] + totals["feat"]) / 1e3,
                         *(100 * fidelity[k]["max"] for k in ("kd_cls", "kd_box", "kd_feat", "total"))])
            print(common.table(["candidate", "kept", "% anchors", "kB/view", "kd_cls %", "kd_box %", "kd_feat %", "total %"], rows[-1:]),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    within = [n for n in results if results[n]["loss_rel_error"] <= LOSS_LIMIT]
    chosen = min(within, key=lambda n: results[n]["kept_anchors"]["mean"]) if within else None
    payload = {**common.header("cpu"), "settings": {k: v for k, v in vars(args).items()}, "teacher": info_t.to_dict(), "anchors": anchors,
               "loss_limit": LOSS_LIMIT, "candidates": results, "smallest_within_limit": chosen}
    path = common.write_json(args.out, payload)
    print(common.table(["candidate", "kept", "% anchors", "kB/view", "kd_cls %", "kd_box %", "kd_feat %", "total %"], rows,
                       title=f"sparse store candidates at {args.imgsz} px ({anchors} anchors), max loss error over batches",
                       footer=[f"smallest within {100 * LOSS_LIMIT:.0f}%: {chosen}", f"written to {path}"]))


if __name__ == "__main__":
    main()
