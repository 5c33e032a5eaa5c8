"""Cost of the distillation terms per training step, config by config.

Each config's terms run forward and backward on one batch shaped as the trainer feeds them: a
student's head outputs and neck features (random, requiring gradients) against a teacher batch read
from a default store (int8 feature maps with per-channel scales, a sparse head with its mask of the
top-K anchors). Configs are interleaved (A B C ... A B C ...) and the medians reported. The student
network itself is not run: this isolates what distillation adds to a step, which
`benchmarks/speed.py` measures end to end.

Channels and strides come from the student and teacher model yamls (no weights are needed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch

from softlabel.builtin import builtin_path, resolve_config

CONFIGS = [builtin_path("distill", name) for name in ("default", "accurate", "logits_only")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="About 1 minute on 2 CPU cores. GPU: --device 0 --imgsz 640 --batch 16")
    p.add_argument("--student", default="yolov8n.yaml", help="student model yaml (default: yolov8n.yaml)")
    p.add_argument("--teacher-cfg", default="yolov8x.yaml", help="teacher model yaml (default: yolov8x.yaml)")
    p.add_argument("--imgsz", type=int, default=160, help="image size, multiple of 32 (default: 160, as speed.py)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8, as speed.py)")
    p.add_argument("--nc", type=int, default=3, help="classes (default: 3, as speed.py's drawn data)")
    p.add_argument("--head-topk", type=int, default=64, help="anchors per image a sparse head keeps; 0: dense head, no mask (default: 64)")
    p.add_argument("--configs", nargs="*", default=[str(c) for c in CONFIGS],
                   help="distillation configs to time (built-in names or YAML paths; default: default, accurate, logits_only)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each term of the first config alone, and it with every feature position (default: on)")
    p.add_argument("--repeats", type=int, default=40, help="timed rounds over the configs, after 5 untimed (default: 40)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: what Ultralytics' trainer sets, cores-1 up to 8)")
    p.add_argument("--device", default="cpu", help="cpu, 0, 1, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tensors (default: 0)")
    p.add_argument("--out", default=str(common.RESULTS / "terms.json"), help="result JSON (default: benchmarks/results/terms.json)")
    args = p.parse_args()
    if args.imgsz % 32:
        p.error("--imgsz must be a multiple of 32")
    return args


def variants(args) -> dict[str, dict]:
    """Name -> raw config mapping: each config file, and the first one's terms alone when asked."""
    from softlabel.yamlfile import read_mapping

    out = {Path(c).stem: read_mapping(resolve_config("distill", c, "--configs"), "distillation config") for c in args.configs}
    if args.breakdown and args.configs:
        name = Path(args.configs[0]).stem
        first = out[name]
        for term in ("cls", "box", "feat"):
            if first.get(term):
                out[f"{name}: {term} alone"] = {term: first[term], "schedule": first.get("schedule") or {}}
        if first.get("feat"):
            out[f"{name}: every feature position"] = {**first, "feat": {**first["feat"], "positions": "all"}}
    return out


def channels(cfg: str, nc: int) -> tuple[list[str], list[int], int, list[int]]:
    from ultralytics.nn.tasks import DetectionModel

    from softlabel.heads import head_spec

    spec = head_spec(DetectionModel(cfg, nc=nc, verbose=False))
    levels, chans, reg_max, strides = list(spec.levels), list(spec.channels), spec.reg_max, list(spec.strides)
    return levels, chans, reg_max, strides


def teacher_batch(args, t_levels, t_ch, strides, reg_max, device):
    """A teacher batch as the trainer gets it from a store: a default store's sparse int8 arrays, or int8 maps."""
    from softlabel.distill.distiller import TeacherBatch

    g = torch.Generator().manual_seed(args.seed)
    b, s = args.batch, args.imgsz
    anchors = sum((s // st) ** 2 for st in strides)
    head = torch.randn(b, 4 * reg_max + args.nc, anchors, generator=g)
    head[:, 4 * reg_max:] -= 4  # mostly background, as a trained teacher sees it
    feats = {lvl: torch.randint(-127, 128, (b, c, s // st, s // st), generator=g, dtype=torch.int8)
             for lvl, c, st in zip(t_levels, t_ch, strides)}
    scales = {lvl: torch.rand(b, c, generator=g) / 127 for lvl, c in zip(t_levels, t_ch)}
    if not args.head_topk:  # a dense store: whole int8 maps
        return TeacherBatch(head.to(device), {k: v.to(device) for k, v in feats.items()}, {k: v.to(device) for k, v in scales.items()})
    # a default store: the kept anchors' int8 head values and feature rows, as collated
    from softlabel.cache.schema import Layout
    from softlabel.select import encode_batch

    sizes = [s // st for st in strides]
    head_maps, start = [], 0
    for n in sizes:
        head_maps.append(head[:, :, start : start + n * n].reshape(b, -1, n, n))
        start += n * n
    dense = [feats[lvl].float() * scales[lvl][:, :, None, None] for lvl in t_levels]
    layout = Layout(count=b, shard_size=b, head={lvl: (head.shape[1], n, n) for lvl, n in zip(t_levels, sizes)},
                    feat={lvl: (c, n, n) for lvl, c, n in zip(t_levels, t_ch, sizes)}, views=["v0"], reg_max=reg_max,
                    nc=args.nc, precision="int8", sparse={"topk": args.head_topk, "floor": 0.0}, feature_layout="sparse")
    st = encode_batch(head_maps, dense, layout)
    # the whole int8 maps ride along for the variants that read every position (a --features dense store)
    return TeacherBatch(feats=feats, feat_scale=scales, index=st["head/index"], values=st["head/values"],
                        values_scale=st["head/scale"], background=st["head/background"], rows=st["feat/rows"],
                        rows_scale=st["feat/scale"], row_levels=tuple(t_levels)).to(device)


def main() -> None:
    args = parse_args()
    from ultralytics.utils import NUM_THREADS

    from softlabel.distill.config import parse_distill
    from softlabel.distill.distiller import Distiller
    from softlabel.dump import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or NUM_THREADS)
    s_levels, s_ch, reg_max, strides = channels(args.student, args.nc)
    t_levels, t_ch, t_reg_max, t_strides = channels(args.teacher_cfg, args.nc)
    if (t_reg_max, t_strides) != (reg_max, strides):
        raise SystemExit(f"student and teacher heads differ: reg_max {reg_max}/{t_reg_max}, strides {strides}/{t_strides}")
    teacher = teacher_batch(args, t_levels, t_ch, strides, reg_max, device)
    anchors = sum((args.imgsz // st) ** 2 for st in strides)
    distillers = {name: Distiller(parse_distill(raw, name), reg_max, s_levels, s_ch, t_levels, t_ch).to(device)
                  for name, raw in variants(args).items()}
    g = torch.Generator().manual_seed(args.seed + 1)

    def student() -> dict:
        b, s = args.batch, args.imgsz
        def leaf(*shape):
            return torch.randn(*shape, generator=g).to(device).requires_grad_()
        return {"scores": leaf(b, args.nc, anchors), "boxes": leaf(b, 4 * reg_max, anchors),
                "feats": [leaf(b, c, s // st, s // st) for c, st in zip(s_ch, strides)]}

    times: dict[str, list[float]] = {name: [] for name in distillers}
    for r in range(5 + args.repeats):
        for name, d in distillers.items():
            inputs = student()
            common.sync(device)
            t = time.perf_counter()
            out = d(inputs, teacher, s_levels)
            sum(out.values()).backward()
            common.sync(device)
            if r >= 5:
                times[name].append((time.perf_counter() - t) * 1e3)

    results = {name: {"ms_median": common.median(v), "ms_min": min(v), "terms": distillers[name].item_names}
               for name, v in times.items()}
    out = common.write_json(args.out, {
        **common.header(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch_threads": torch.get_num_threads(),
        "anchors": anchors,
        "student_channels": s_ch,
        "teacher_channels": t_ch,
        "configs": results,
    })
    rows = [[name, r["ms_median"], r["ms_min"], ", ".join(r["terms"])] for name, r in results.items()]
    title = (f"distillation terms, forward + backward: {args.student} against {args.teacher_cfg} channels "
             f"{t_ch}, batch {args.batch} at {args.imgsz} px ({anchors} anchors), sparse head top-{args.head_topk or 'all'}, "
             f"int8 maps, device {args.device}, {torch.get_num_threads()} thread(s), medians of {args.repeats}")
    print(common.table(["config", "ms median", "ms min", "terms"], rows, title, [f"written to {out}"]))


if __name__ == "__main__":
    main()
