"""What a cohort saves: N students trained at once on one batch stream against the same N in turn.

For N = 1, 2, 4 (yolov8n, yolo11n, yolo26n, yolov8n again) and each way of training, one fresh process
trains the students against one cache and measures:

- wall seconds for the whole job;
- data-path CPU seconds: the thread CPU time spent in the training set's replay, cache read and
  collate (DistillDataset.__getitem__ and collate_fn, wrapped with time.thread_time), the work a
  cohort does once per batch and students in turn do once per student;
- the data path per student-sample: those seconds / (N x samples trained per student);
- peak resident memory of the process (ru_maxrss).

The data path per student-sample should fall as 1/N in a cohort and stay flat in turn. One job's
data-path CPU varies by several per cent from run to run on a 2-core machine, so every job runs
--repeats times, the rounds interleaved (a slow spell hits every N alike), and each measure is the
median over the rounds; every round is kept in the JSON. The GPU projection divides the measured
data-path cost per image and core into an assumed GPU step rate.

Every job passes workers=0, so the data path runs in the training process, in a student's thread,
as Ultralytics runs it on a CPU (where it sets workers=0 itself), inside this process's thread
clocks. A job that times fewer samples than it trained (a data path moved out of their sight, such
as into a DataLoader worker) fails rather than report a share it did not see.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

FAMILY = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolov8n.yaml"]
COUNTS = (1, 2, 4)
# A training step of a nano detector on one current data-centre GPU, images per second (an assumption for the
# projection, not measured here: no GPU was available; gpu.sh measures the real rate where one is)
ASSUMED_GPU_STEP_RATE = 1000.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, nargs="+", default=[320, 640], help="image sizes, one cache each (default: 320 640)")
    p.add_argument("--images", type=int, nargs="+", default=[128, 32], help="training images, one per --imgsz (default: 128 32)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per student (default: 2)")
    p.add_argument("--batch", type=int, default=8, help="batch (default: 8)")
    p.add_argument("--nc", type=int, default=80, help="classes the data.yaml names (default: 80)")
    p.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="cohort sizes N (default: 1 2 4)")
    p.add_argument("--teacher-cfg", default="yolov8x.yaml", help="teacher yaml, random weights calibrated to the typical kept "
                   "anchors (default: yolov8x.yaml)")
    p.add_argument("--device", default="cpu", help="training device: cpu, 0, cuda:N (default: cpu)")
    p.add_argument("--out", default=str(common.RESULTS / "cohort.json"), help="result JSON (default: benchmarks/results/cohort.json)")
    p.add_argument("--modes", nargs="+", default=["in_turn", "cohort"], choices=["in_turn", "cohort"], help="(default: both)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every job; medians are reported (default: 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, 8 images, N = 1 2, one round")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one measured job, in its own process
    args = p.parse_args()
    if args.quick:
        args.imgsz, args.images, args.counts, args.teacher_cfg, args.repeats = [64], [8], [1, 2], "yolov8n.yaml", 1
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def warm_up(spec: dict, samples: int = 8) -> None:
    """Replay, read and collate a few samples once, outside the measurement."""
    from softlabel.cache.reader import CacheReader
    from softlabel.data import build_index, load_data_yaml
    from softlabel.replay import Replay
    from softlabel.train import DistillDataset, ViewPlan

    reader = CacheReader(spec["cache"])
    desc = reader.description
    replay = Replay(build_index(load_data_yaml(spec["data"]), "train", check_images=False), desc.augment.config, spec["imgsz"],
                    desc.augment.seed)
    ds = DistillDataset(replay, ViewPlan(1, 0, desc.augment.views, desc.augment.close_views), reader)
    DistillDataset.collate_fn([ds[(i, 0)] for i in range(min(samples, len(ds)))])


def run_job(spec: dict) -> dict:
    """One job in this process: N students against the cache, at once or in turn."""
    import threading

    from softlabel.train import runner
    from softlabel.train.cohort import run_cohort
    from softlabel.train.dataset import DistillDataset

    clock = {"seconds": 0.0, "samples": 0, "collate_seconds": 0.0}
    lock = threading.Lock()
    get, collate = DistillDataset.__getitem__, DistillDataset.collate_fn

    def timed_get(self, item):
        t = time.thread_time()
        out = get(self, item)
        with lock:
            clock["seconds"] += time.thread_time() - t
            clock["samples"] += 1
        return out

    def timed_collate(batch):
        t = time.thread_time()
        out = collate(batch)
        with lock:
            clock["seconds"] += time.thread_time() - t
            clock["collate_seconds"] += time.thread_time() - t
        return out

    warm_up(spec)  # the process's one-time costs (imports, codec and OpenCV set-up) are nobody's per-sample cost
    DistillDataset.__getitem__ = timed_get
    DistillDataset.collate_fn = staticmethod(timed_collate)
    students = FAMILY[: spec["n"]]
    settings = {"cache": spec["cache"]}
    args = dict(data=spec["data"], epochs=spec["epochs"], imgsz=spec["imgsz"], batch=spec["batch"], workers=0, seed=0, close_mosaic=0,
                plots=False, device=spec["device"], val=False, exist_ok=True, project=spec["project"], name="run")
    start = time.perf_counter()
    if spec["mode"] == "cohort":
        rows = run_cohort(students, [], settings, args, echo=lambda *a: None)
    else:
        rows = runner.train_students(students, settings, **args)
    wall = time.perf_counter() - start
    per_student = spec["images"] * spec["epochs"]
    if clock["samples"] < per_student * (1 if spec["mode"] == "cohort" else spec["n"]):
        raise RuntimeError(f"{clock['samples']} samples timed, fewer than the job trained: the data path ran out of the clocks' sight")
    return {"wall_seconds": wall, "data_cpu_seconds": clock["seconds"], "collate_cpu_seconds": clock["collate_seconds"],
            "samples_replayed": clock["samples"],
            "data_cpu_seconds_per_student_sample": clock["seconds"] / (spec["n"] * per_student),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_device_mb": peak_device_mb(),
            "statuses": [r.status for r in rows]}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def peak_device_mb() -> float | None:
    """The most CUDA memory torch held at once in this process, or None on a CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def medians(rounds: list[dict]) -> dict:
    """One job's measures over its rounds: the median of each number, each round's own under 'rounds'."""
    import statistics

    out: dict = {}
    for key, value in rounds[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rounds)
        else:  # peak_device_mb (None on a CPU), statuses: the first round's
            out[key] = value
    if any(r["statuses"] != rounds[0]["statuses"] for r in rounds):
        out["statuses"] = [r["statuses"] for r in rounds]
    out["rounds"] = rounds
    return out


def gpu_projection(results: dict, counts: list[int]) -> dict:
    """Cores of data path that keep one GPU busy. A GPU stepping students at ASSUMED_GPU_STEP_RATE images/s takes
    that many images/s from the data path when students train in turn, and 1/N of it from a cohort of N (each
    batch feeds N student steps). The data path's CPU per image is the lone student's, measured here."""
    out = {}
    for imgsz, size in results.items():
        per_image = size.get("1", {}).get("in_turn", {}).get("data_cpu_seconds_per_student_sample")
        if not per_image:
            continue
        need = ASSUMED_GPU_STEP_RATE * per_image
        out[imgsz] = {"data_path_cpu_ms_per_image": 1000 * per_image, "images_per_second_per_core": 1 / per_image,
                      "cores_to_keep_the_gpu_busy_in_turn": need,
                      "cores_to_keep_the_gpu_busy_as_a_cohort": {str(n): need / n for n in counts}}
    return out


def main() -> None:
    args = parse_args()
    if args.job:
        spec = json.loads(Path(args.job).read_text())
        Path(spec["result"]).write_text(json.dumps(run_job(spec)))
        return
    from softlabel.dump import DumpSettings, run_dump

    work = Path(tempfile.mkdtemp(prefix="softlabel-cohort-"))
    results: dict = {}
    try:
        if len(args.images) != len(args.imgsz):
            raise SystemExit("cohort.py: give one --images per --imgsz")
        for imgsz, images in zip(args.imgsz, args.images):
            data = common.make_data(work / f"data{imgsz}", images, 4, imgsz, nc=args.nc)
            teacher, _ = common.make_kept_teacher(args.teacher_cfg, data, work / f"teacher{imgsz}.pt", imgsz, None, args.device)
            cache = work / f"cache{imgsz}.zarr"
            run_dump(DumpSettings(teacher=str(teacher), data=str(data), out=str(cache), views=1, close_views=0, imgsz=imgsz,
                                  batch=args.batch, workers=1, progress=False, device=args.device))
            rounds: dict = {}
            # rounds interleaved: a slow spell of the machine hits every N and mode alike
            for r, n, mode in [(r, n, mode) for r in range(args.repeats) for n in args.counts for mode in args.modes]:
                spec = {"n": n, "mode": mode, "cache": str(cache), "data": str(data), "imgsz": imgsz, "batch": args.batch,
                        "epochs": args.epochs, "images": images, "device": args.device, "project": str(work / f"runs{imgsz}-{mode}-{n}-{r}"),
                        "result": str(work / "job.json")}
                (work / "spec.json").write_text(json.dumps(spec))
                subprocess.run([sys.executable, __file__, "--job", str(work / "spec.json")], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                res = json.loads((work / "job.json").read_text())
                shutil.rmtree(spec["project"], ignore_errors=True)  # a round starts afresh: a cohort folder left here would resume
                rounds.setdefault(str(n), {}).setdefault(mode, []).append(res)
                print(f"round {r + 1}/{args.repeats}  {imgsz} px  N={n}  {mode:<8} wall {res['wall_seconds']:7.1f} s  data path "
                      f"{1000 * res['data_cpu_seconds_per_student_sample']:7.2f} ms CPU per student-sample "
                      f"(collate {1000 * res['collate_cpu_seconds']:.0f} ms of {1000 * res['data_cpu_seconds']:.0f} ms)  "
                      f"peak {res['peak_rss_mb']:.0f} MB  {res['statuses']}", flush=True)
            results[str(imgsz)] = {n: {mode: medians(rs) for mode, rs in modes.items()} for n, modes in rounds.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows, checks = [], {}
    for imgsz, size in results.items():
        one = size.get("1", {}).get("cohort", {}).get("data_cpu_seconds_per_student_sample")
        for n, modes in size.items():
            c, t = modes.get("cohort", {}), modes.get("in_turn", {})  # --modes may have run one of the two
            share = c.get("data_cpu_seconds_per_student_sample")
            expected = one / int(n) if one else None
            off = (share / expected - 1) if expected and share else None
            checks[f"{imgsz}/N={n}"] = off
            walls = t.get("wall_seconds"), c.get("wall_seconds")
            rows.append([f"{imgsz}", n, *walls, walls[0] / walls[1] if None not in walls else None,
                         ms(t.get("data_cpu_seconds_per_student_sample")), ms(share),
                         None if off is None else 100 * off, t.get("peak_rss_mb"), c.get("peak_rss_mb")])
    projection = gpu_projection(results, args.counts)
    within = all(v is not None and abs(v) <= 0.10 for v in checks.values())
    payload = {**common.header(args.device), "settings": {k: v for k, v in vars(args).items() if k != "job"}, "students": FAMILY,
               "results": results, "one_over_n_error": checks, "one_over_n_within_10pct": within,
               "gpu_projection": {"assumed_gpu_step_images_per_second": ASSUMED_GPU_STEP_RATE, "by_imgsz": projection}}
    for imgsz, p in projection.items():
        print(f"{imgsz} px: the data path costs {p['data_path_cpu_ms_per_image']:.1f} ms CPU per image; a GPU stepping "
              f"{ASSUMED_GPU_STEP_RATE:.0f} student images/s needs {p['cores_to_keep_the_gpu_busy_in_turn']:.1f} cores in turn, "
              + ", ".join(f"{c:.1f} as a cohort of {n}" for n, c in p["cores_to_keep_the_gpu_busy_as_a_cohort"].items()))
    path = common.write_json(args.out, payload)
    print(common.table(["imgsz", "N", "in turn s", "cohort s", "speed-up", "data ms/st-sample turn", "data ms/st-sample cohort",
                        "off 1/N %", "peak MB turn", "peak MB cohort"], rows,
                       title="N students, in turn and as a cohort: wall time, data-path CPU per student-sample, peak memory "
                       f"(medians of {args.repeats} round{'s' if args.repeats > 1 else ''})",
                       footer=[f"data path per student-sample within 10% of 1/N: {common.verdict(within)}", f"written to {path}"]))


if __name__ == "__main__":
    main()
