#!/usr/bin/env bash
# The GPU check at the operating point: 640 px, 80 classes, a YOLOv8x teacher (random weights, built from yaml and
# calibrated to keep a trained teacher's anchors), one GPU. One script, progress on stdout, JSON out. Its steps are
# sized to end within BUDGET (480 s) on one H200; the YOLO26 parts run last, and only while the time spent so far
# leaves room for their estimate (DUMP26_EST, SPEED26_EST), so the whole stays within it by construction:
#
#   1. the CUDA tests: python3 -m pytest -q -m cuda tests/test_cuda.py    (skipped without CUDA)
#   2. the user's commands at this size, each timed: softlabel dump --device --workers, softlabel verify, softlabel
#      train offline (from the cache) and online (live teacher), 2 epochs -> benchmarks/results/gpu-cli.json
#   3. dump throughput against the teacher's forward pass (AMP, batch 32, workers = cores), default store
#                                                                           -> benchmarks/results/gpu-dump.json
#   4. cached-sample delivery of the training dataset with 8 workers       -> benchmarks/results/gpu-read.json
#   5. epoch time of a yolov8n student: plain, offline, online and Ultralytics' own distill_model=, ~500 images
#                                                                           -> benchmarks/results/gpu-speed.json
#   6. if time allows: step 3 with a YOLO26 teacher (yolo26x)              -> benchmarks/results/gpu-dump-yolo26.json
#      and step 5 for a yolo26n student (plain, offline) from yolo26x     -> benchmarks/results/gpu-speed-yolo26.json
#   7. if time allows: a cohort of N = 1, 2, 4 students against the same in turn (benchmarks/cohort.py at 640 px)
#                                                                           -> benchmarks/results/gpu-cohort.json
#   and a summary naming the device (torch.cuda.get_device_name, or cpu)   -> benchmarks/results/gpu.json
# Every JSON names the device. A failing test, command or step is recorded and the next step runs; the script then
# exits 1. With OUT set, the JSON files and the tests' log are copied there (9 files).
#
# Sizes, from estimates for one H200 with 16 CPU cores (not yet measured there; gpu.json records when each step
# started, to set them from): wheels and imports ~15 s; 1: ~90 s (two tiny teachers trained on the CPU, small dumps
# and two one-epoch trainings on the GPU); 2: ~100 s (256 images, 512 sample-views, 2 epochs each way); 3: ~40 s
# (512 images, 1 repeat); 4: ~45 s (256 images, 1 repeat); 5: ~110 s (500 images, 3 epochs, 4 runs). About 400 s
# before step 6, whose parts start only while they fit in what is left of BUDGET. Every data set, teacher
# calibration (on the GPU) and run is fixed-size: nothing grows with the machine's speed.
#
# A random-weight teacher scores every anchor below the default floor, so each store is dumped with the anchors a
# trained teacher keeps on a typical image (--kept in dump.py, read.py, speed.py: 135 at 640 px, the mean topk.py
# measured); --kept 512, the cap, would bound bytes and time from above.
#
# Usage
#   bash benchmarks/gpu.sh fetch   on a machine with pip access: wheels of what the GPU image lacks go to .whl/
#                                  (ignored by git), for Python 3.12 on x86-64
#   bash benchmarks/gpu.sh         on the GPU machine: installs .whl/ if present, then runs 1-6
#   SMOKE=1 bash benchmarks/gpu.sh on a CPU: the same steps at toy sizes (the CUDA tests skip), to check the script
#                                  itself; it also records every module the steps import and checks that the GPU
#                                  image has it or the wheel list brings it (benchmarks/gpu_imports.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_VERBOSE=False
START=$(date +%s)
SMOKE=${SMOKE:-0}

# What the GPU image (Python 3.12, torch 2.11, numpy, opencv-python-headless, pillow, pyyaml, click, tqdm, scipy,
# scikit-learn, matplotlib, psutil, requests, packaging, nvidia-ml-py, pytest, ...) lacks, each pinned to the version
# the development environment runs; --no-deps, so every dependency is named. typing-extensions: pydantic and
# pydantic-core need >= 4.16, newer than the image may hold. Not here: polars (Ultralytics' trainer imports it to put
# results.csv into each checkpoint; its wheel, ~54 MB, would nearly fill the 64 MiB a run carries): the GPU run uses
# the stand-in benchmarks/gpu_stubs/polars.py instead (that module says why no measured path depends on it).
WHEELS=(ultralytics==8.4.190 ultralytics-thop==2.2.3 zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6
        crc32c==2.9.post0 google-crc32c==1.9.0 albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2
        simsimd==6.5.16 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 torch-pruning==1.6.1)

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d .whl "$w"
    done
    wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
    tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
    echo "wheels $((wheels / 1048576)) MiB + tracked tree $((tree / 1048576)) MiB = $(((wheels + tree) / 1048576)) MiB (a run carries at most 64)"
    exit 0
fi

if [[ "$SMOKE" != "1" && -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then  # a smoke run uses the local install
    echo "[gpu.sh] installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
POLARS=installed
if [[ "$SMOKE" != "1" ]] && ! python3 -c "import polars" 2>/dev/null; then
    export PYTHONPATH="$PWD/benchmarks/gpu_stubs:$PYTHONPATH"
    POLARS="stand-in (benchmarks/gpu_stubs/polars.py)"
fi

RESULTS=benchmarks/results
if [[ "$SMOKE" == "1" ]]; then
    DEVICE=cpu; IMGSZ=64; TEACHER=yolov8n.yaml; TEACHER26=yolo26n.yaml; BATCH=8
    DUMP_IMAGES=16; READ_IMAGES=16; SPEED_IMAGES=16; CLI_IMAGES=16; VAL_IMAGES=4; COHORT_IMAGES=8
    RESULTS=$(mktemp -d)
    # record every module each Python process of the steps imports (checked at the end)
    IMPORTS="$RESULTS/imports"; mkdir -p "$IMPORTS/log"
    python3 benchmarks/gpu_imports.py hook "$IMPORTS/hook" >/dev/null
    export GPU_IMPORTS_LOG="$IMPORTS/log" PYTHONPATH="$IMPORTS/hook:$PYTHONPATH"
else
    DEVICE=0; IMGSZ=640; TEACHER=yolov8x.yaml; TEACHER26=yolo26x.yaml; BATCH=32
    DUMP_IMAGES=512; READ_IMAGES=256; SPEED_IMAGES=500; CLI_IMAGES=256; VAL_IMAGES=16; COHORT_IMAGES=256
fi
EPOCHS=3          # speed.py times the epochs between the first and the last
CLI_EPOCHS=2      # the user's train commands: one mosaic epoch, one closing epoch
BUDGET=480        # seconds for the whole script on the GPU machine
DUMP26_EST=60     # step 6's parts: data, teacher built and calibrated, dump and forward passes of 512 images
SPEED26_EST=90    # data, teacher, dump of 500 images, two 3-epoch student runs
COHORT_EST=150    # step 7: data, teacher, dump of 256 images, 6 jobs of 1-4 students for 2 epochs, each in a new process
CORES=$(nproc)
TRAIN_WORKERS=$(( CORES < 8 ? CORES : 8 ))
mkdir -p "$RESULTS"
rm -f "$RESULTS"/gpu*.json  # an earlier run's: a step skipped or failed now must not leave its old numbers behind
SCRATCH=$(mktemp -d)  # the steps' records (times, exit codes, the tests' log); the summary reads them
STEPS="$SCRATCH/steps.tsv"; : > "$STEPS"
FAILED=()

elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "[gpu.sh] $(elapsed) s: $*"; printf '%s\t%s\n' "$(elapsed)" "$*" >> "$STEPS"; }
fits() { [[ "$SMOKE" == "1" ]] || (( $(elapsed) + $1 <= BUDGET )); }
# run a command, recording its name, exit status, seconds and command line; a failure is recorded, not fatal
timed() {
    local name=$1; shift
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    "$@" || rc=$?
    t1=$(date +%s.%N)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')" "$*" >> "$SCRATCH/cli.tsv"
    if (( rc != 0 )); then FAILED+=("$name (exit $rc)"); fi
}
# run a benchmark step; a failure is recorded, not fatal, so that the other steps' results still come back
bench() {
    local name=$1 rc=0; shift
    "$@" || rc=$?
    if (( rc != 0 )); then FAILED+=("$name (exit $rc)"); fi
}

python3 -c "import torch, ultralytics, zarr, albumentations, softlabel; print('[gpu.sh] torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ultralytics', ultralytics.__version__, 'polars: $POLARS')"

step "1/6 the CUDA tests"
t0=$(date +%s)
TESTS_RC=0
python3 -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider 2>&1 | tee "$SCRATCH/gpu-tests.log" || TESTS_RC=${PIPESTATUS[0]}
printf '%s\t%s\n' "$TESTS_RC" "$(( $(date +%s) - t0 ))" > "$SCRATCH/tests.tsv"
if (( TESTS_RC != 0 )); then FAILED+=("CUDA tests (exit $TESTS_RC)"); fi

step "2/6 the user's commands: dump, verify, train offline and online ($CLI_IMAGES images at $IMGSZ px, $TEACHER, $CLI_EPOCHS epochs)"
CLI=$(mktemp -d)
: > "$SCRATCH/cli.tsv"
bench cli-data python3 - "$CLI" "$CLI_IMAGES" "$VAL_IMAGES" "$IMGSZ" "$TEACHER" "$DEVICE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common
root, images, val, imgsz, cfg, device = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
data = common.make_data(root / "data", images, val, imgsz, nc=80)
_, calibration = common.make_kept_teacher(cfg, data, root / "teacher.pt", imgsz, None, device)
print(f"[gpu.sh] {images} training images, teacher {cfg} calibrated: {calibration['kept_mean']:.0f} anchors kept per image")
PY
SOFTLABEL=(python3 -m softlabel)
timed dump "${SOFTLABEL[@]}" dump --teacher "$CLI/teacher.pt" --data "$CLI/data/data.yaml" --out "$CLI/cache.zarr" \
    --views 1 --close-views 1 --imgsz "$IMGSZ" --batch "$BATCH" --device "$DEVICE" --workers "$CORES" --quiet
timed verify "${SOFTLABEL[@]}" verify "$CLI/cache.zarr" --samples 16 --device "$DEVICE"
timed train_offline "${SOFTLABEL[@]}" train --student yolov8n.yaml --cache "$CLI/cache.zarr" --epochs "$CLI_EPOCHS" \
    --close-mosaic 1 --batch "$BATCH" --device "$DEVICE" --workers "$TRAIN_WORKERS" --project "$CLI/runs" --name offline
timed train_online "${SOFTLABEL[@]}" train --student yolov8n.yaml --teacher "$CLI/teacher.pt" --data "$CLI/data/data.yaml" \
    --views 1 --close-views 1 --epochs "$CLI_EPOCHS" --close-mosaic 1 --imgsz "$IMGSZ" --batch "$BATCH" \
    --device "$DEVICE" --workers "$TRAIN_WORKERS" --project "$CLI/runs" --name online
bench cli-json python3 - "$RESULTS" "$SCRATCH" "$DEVICE" "$CLI_IMAGES" "$IMGSZ" "$TEACHER" "$CLI_EPOCHS" "$BATCH" "$CORES" "$TRAIN_WORKERS" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common
results, scratch, device, images, imgsz, teacher, epochs, batch, cores, workers = sys.argv[1:]
steps = {}
for line in (Path(scratch) / "cli.tsv").read_text().splitlines():
    name, rc, seconds, command = line.split("\t", 3)
    steps[name] = {"seconds": float(seconds), "exit_code": int(rc), "command": command}
sample_views = 2 * int(images)  # one mosaic and one closing view of each image
if "dump" in steps and steps["dump"]["exit_code"] == 0:
    steps["dump"]["sample_views_per_sec"] = sample_views / steps["dump"]["seconds"]
common.write_json(Path(results) / "gpu-cli.json", {
    "device": common.device_name(device),
    **common.header(device),
    "settings": {"images": int(images), "imgsz": int(imgsz), "nc": 80, "teacher": f"{teacher} (random weights, calibrated)",
                 "student": "yolov8n.yaml", "views": 1, "close_views": 1, "sample_views": sample_views,
                 "epochs": int(epochs), "close_mosaic": 1, "batch": int(batch), "dump_workers": int(cores),
                 "train_workers": int(workers), "verify_samples": 16},
    "timing": "wall seconds of each command, process start to exit (imports, setup, final validation included)",
    "steps": steps,
})
print(json.dumps({k: round(v["seconds"], 1) if v["exit_code"] == 0 else f"exit {v['exit_code']}" for k, v in steps.items()}))
PY

step "3/6 dump against the teacher's forward pass ($TEACHER, $IMGSZ px, 80 classes, batch $BATCH, $CORES workers)"
bench dump python3 benchmarks/dump.py --device "$DEVICE" --imgsz "$IMGSZ" --batch "$BATCH" --workers "$CORES" --teacher-cfg "$TEACHER" \
    --nc 80 --images "$DUMP_IMAGES" --repeats 1 --default-only --out "$RESULTS/gpu-dump.json"

step "4/6 cached-sample delivery, 8 workers ($IMGSZ px, 80 classes)"
bench read python3 benchmarks/read.py --device "$DEVICE" --imgsz "$IMGSZ" --workers 0,8 --teacher-cfg "$TEACHER" --nc 80 \
    --images "$READ_IMAGES" --epochs 1 --repeats 1 --dump-workers "$CORES" --out "$RESULTS/gpu-read.json"

step "5/6 epoch time: plain, offline, online, Ultralytics' distill_model=; yolov8n, $SPEED_IMAGES images at $IMGSZ px"
bench speed python3 benchmarks/speed.py --device "$DEVICE" --imgsz "$IMGSZ" --images "$SPEED_IMAGES" --batch "$BATCH" --epochs "$EPOCHS" \
    --repeats 1 --modes plain,offline,online,ultralytics --workers "$TRAIN_WORKERS" --dump-workers "$CORES" \
    --teacher-cfg "$TEACHER" --nc 80 --out "$RESULTS/gpu-speed.json"

SKIPPED=()
if fits "$DUMP26_EST"; then
    step "6/6 dump against the teacher's forward pass, YOLO26 teacher ($TEACHER26)"
    bench dump-yolo26 python3 benchmarks/dump.py --device "$DEVICE" --imgsz "$IMGSZ" --batch "$BATCH" --workers "$CORES" --teacher-cfg "$TEACHER26" \
        --nc 80 --images "$DUMP_IMAGES" --repeats 1 --default-only --out "$RESULTS/gpu-dump-yolo26.json"
else
    SKIPPED+=("dump-yolo26: $(elapsed) s spent, its estimate $DUMP26_EST s would pass the budget of $BUDGET s")
fi
if fits "$SPEED26_EST"; then
    step "6/6 epoch time, yolo26n student from $TEACHER26: plain, offline"
    bench speed-yolo26 python3 benchmarks/speed.py --device "$DEVICE" --imgsz "$IMGSZ" --images "$SPEED_IMAGES" --batch "$BATCH" --epochs "$EPOCHS" \
        --repeats 1 --modes plain,offline --student yolo26n.yaml --workers "$TRAIN_WORKERS" --dump-workers "$CORES" \
        --teacher-cfg "$TEACHER26" --nc 80 --out "$RESULTS/gpu-speed-yolo26.json"
else
    SKIPPED+=("speed-yolo26: $(elapsed) s spent, its estimate $SPEED26_EST s would pass the budget of $BUDGET s")
fi
if fits "$COHORT_EST"; then
    step "7/7 a cohort of N = 1, 2, 4 students against the same in turn ($COHORT_IMAGES images at $IMGSZ px)"
    bench cohort python3 benchmarks/cohort.py --device "$DEVICE" --imgsz "$IMGSZ" --images "$COHORT_IMAGES" --batch "$BATCH" \
        --teacher-cfg "$TEACHER" --repeats 1 --out "$RESULTS/gpu-cohort.json"
else
    SKIPPED+=("cohort: $(elapsed) s spent, its estimate $COHORT_EST s would pass the budget of $BUDGET s")
fi

step "summary"
printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}" > "$SCRATCH/skipped.txt"
printf '%s\n' "${FAILED[@]+"${FAILED[@]}"}" > "$SCRATCH/failed.txt"
bench summary python3 - "$RESULTS" "$SCRATCH" "$DEVICE" "$SMOKE" "$POLARS" "$(elapsed)" <<'PY'
import datetime, json, subprocess, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import common
results, scratch, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
smoke, polars, seconds = sys.argv[4] == "1", sys.argv[5], int(sys.argv[6])
names = {"cli": "gpu-cli", "dump": "gpu-dump", "dump_yolo26": "gpu-dump-yolo26", "read": "gpu-read", "speed": "gpu-speed",
         "speed_yolo26": "gpu-speed-yolo26", "cohort": "gpu-cohort"}
parts = {k: json.loads((results / f"{v}.json").read_text()) for k, v in names.items() if (results / f"{v}.json").is_file()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    smi = None
rc, test_seconds = (scratch / "tests.tsv").read_text().split()
log = (scratch / "gpu-tests.log").read_text().strip().splitlines()
lines = lambda name: [ln for ln in (scratch / name).read_text().splitlines() if ln.strip()]  # noqa: E731
strip = lambda d: {k: v for k, v in d.items() if k not in ("machine", "command", "date", "settings")}  # noqa: E731


def dump(p):
    return {k: p[k] for k in ("dump_images_per_sec", "forward_images_per_sec", "ratio_dump_over_forward")} | {
        "teacher": p["settings"]["teacher_cfg"], "images": p["settings"]["images"]}


summary = {
    "device": common.device_name(device),
    "nvidia_smi": smi,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": ("SMOKE=1 " if smoke else "") + "bash benchmarks/gpu.sh",
    "seconds": seconds,
    "steps_started_at": {line.split("\t", 1)[1]: int(line.split("\t", 1)[0]) for line in lines("steps.tsv")},
    "polars": polars,
    "cuda_tests": {"exit_code": int(rc), "seconds": int(test_seconds), "result": log[-1] if log else ""},
    "cli": parts.get("cli", {}).get("steps"),
    "dump": {k: dump(parts[k]) for k in ("dump", "dump_yolo26") if k in parts},
    "read": strip(parts["read"]) if "read" in parts else None,
    "speed": {k: strip(parts[k]) for k in ("speed", "speed_yolo26") if k in parts},
    "cohort": {k: parts["cohort"][k] for k in ("results", "one_over_n_error", "gpu_projection")} if "cohort" in parts else None,
    "skipped": lines("skipped.txt"),
    "failed": lines("failed.txt"),
    "parts": {k: str(results / f"{names[k]}.json") for k in parts},
}
common.write_json(results / "gpu.json", summary)
short = {"device": summary["device"], "seconds": seconds, "cuda_tests": summary["cuda_tests"]["result"],
         "cli_seconds": {k: v["seconds"] for k, v in (summary["cli"] or {}).items()},
         "dump_over_forward": {k: round(v["ratio_dump_over_forward"], 3) for k, v in summary["dump"].items()},
         "speed_sec_per_epoch": {k: {m: round(x["sec_per_epoch"], 3) for m, x in v["modes"].items()} for k, v in summary["speed"].items()},
         "skipped": summary["skipped"], "failed": summary["failed"]}
print(json.dumps(short, indent=2))
print(f"written to {results / 'gpu.json'}")
PY
if [[ -n "${OUT:-}" ]]; then cp "$RESULTS"/gpu*.json "$SCRATCH/gpu-tests.log" "$OUT"/ || true; fi  # 9 files at most

if [[ "$SMOKE" == "1" ]]; then
    step "the modules the steps imported, against the wheel list and the GPU image"
    GPU_IMPORTS_LOG= python3 benchmarks/gpu_imports.py check "$IMPORTS/log" "${WHEELS[@]}" --csv-root "$CLI/runs" \
        || FAILED+=("import check")
fi
step "done"
rm -rf "$CLI" "$SCRATCH"
if (( ${#FAILED[@]} )); then
    echo "[gpu.sh] FAILED: ${FAILED[*]}"
    exit 1
fi
