#!/usr/bin/env bash
# The GPU check at the operating point: 640 px, 80 classes, a YOLOv8x teacher (random weights,
# built from yaml), one GPU. One script, under 8 minutes on an H200, progress on stdout, JSON out:
#
#   1. dump throughput against the teacher's pure forward pass (AMP, batch 32, workers = cores),
#      default store only                                  -> benchmarks/results/gpu-dump.json
#   2. cached-sample delivery of the training dataset with 8 workers -> benchmarks/results/gpu-read.json
#   3. offline against plain epoch time, yolov8n student, ~500 images -> benchmarks/results/gpu-speed.json
#   and a summary with the device named                  -> benchmarks/results/gpu.json
#
# A random-weight teacher scores every anchor below the default floor, so each store is dumped with
# the anchors a trained teacher keeps on a typical image (--kept in dump.py, read.py, speed.py: 135
# at 640 px, the mean topk.py measured); --kept 512, the cap, would bound bytes and time from above.
#
# Usage
#   bash benchmarks/gpu.sh fetch   on a machine with pip access: wheels of what a bare GPU image lacks
#                                  go to .whl/ (ignored by git), for Python 3.12 on x86-64
#   bash benchmarks/gpu.sh         on the GPU machine: installs .whl/ if present, then runs 1-3
#   SMOKE=1 bash benchmarks/gpu.sh on a CPU: the same steps at toy sizes, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 YOLO_VERBOSE=False

# what the GPU image (torch, numpy, opencv, pillow, pyyaml, click, tqdm, scipy, matplotlib, ...) lacks
WHEELS=(ultralytics==8.4.190 ultralytics-thop==2.2.3 zarr==3.1.6 donfig numcodecs crc32c google-crc32c
        albumentations==2.0.8 albucore==0.0.24 stringzilla simsimd pydantic pydantic-core annotated-types
        typing-inspection torch-pruning==1.6.1)

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p .whl
    for w in "${WHEELS[@]}"; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d .whl "$w"
    done
    du -sh .whl
    exit 0
fi

if [[ "${SMOKE:-0}" != "1" && -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then  # a smoke run uses the local install
    echo "[gpu.sh] installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, ultralytics, zarr, albumentations, softlabel; print('[gpu.sh] torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ultralytics', ultralytics.__version__)"

RESULTS=benchmarks/results
if [[ "${SMOKE:-0}" == "1" ]]; then
    DEVICE=cpu; IMGSZ=64; TEACHER=yolov8n.yaml; DUMP_IMAGES=16; BATCH=8; READ_IMAGES=16; SPEED_IMAGES=16; EPOCHS=3
    RESULTS=$(mktemp -d)
else
    DEVICE=0; IMGSZ=640; TEACHER=yolov8x.yaml; DUMP_IMAGES=512; BATCH=32; READ_IMAGES=256; SPEED_IMAGES=500; EPOCHS=3
fi
CORES=$(nproc)
START=$(date +%s)
step() { echo; echo "[gpu.sh] $(( $(date +%s) - START )) s: $*"; }

step "1/3 dump against the teacher's forward pass ($TEACHER, $IMGSZ px, 80 classes, batch $BATCH, $CORES workers)"
python3 benchmarks/dump.py --device "$DEVICE" --imgsz "$IMGSZ" --batch "$BATCH" --workers "$CORES" --teacher-cfg "$TEACHER" \
    --nc 80 --images "$DUMP_IMAGES" --repeats 1 --default-only --out "$RESULTS/gpu-dump.json"

step "2/3 cached-sample delivery, 8 workers ($IMGSZ px, 80 classes)"
python3 benchmarks/read.py --device "$DEVICE" --imgsz "$IMGSZ" --workers 0,8 --teacher-cfg "$TEACHER" --nc 80 \
    --images "$READ_IMAGES" --epochs 1 --dump-workers "$CORES" --out "$RESULTS/gpu-read.json"

step "3/3 offline against plain epoch time, yolov8n, $SPEED_IMAGES images at $IMGSZ px"
python3 benchmarks/speed.py --device "$DEVICE" --imgsz "$IMGSZ" --images "$SPEED_IMAGES" --batch 32 --epochs "$EPOCHS" \
    --repeats 1 --modes plain,offline --workers 8 --dump-workers "$CORES" --teacher-cfg "$TEACHER" --nc 80 \
    --out "$RESULTS/gpu-speed.json"

step "summary"
python3 - "$RESULTS" <<'PY'
import json, sys, datetime, subprocess
from pathlib import Path
results = Path(sys.argv[1])
parts = {name: json.loads((results / f"gpu-{name}.json").read_text()) for name in ("dump", "read", "speed")}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
    smi = None
summary = {
    "device": smi or parts["dump"]["machine"].get("gpus") or "cpu",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "bash benchmarks/gpu.sh",
    "dump_images_per_sec": parts["dump"]["dump_images_per_sec"],
    "forward_images_per_sec": parts["dump"]["forward_images_per_sec"],
    "ratio_dump_over_forward": parts["dump"]["ratio_dump_over_forward"],
    "read": {k: v for k, v in parts["read"].items() if k not in ("machine", "command", "date", "settings")},
    "speed": {k: v for k, v in parts["speed"].items() if k not in ("machine", "command", "date", "settings")},
    "parts": {name: str(results / f"gpu-{name}.json") for name in parts},
}
(results / "gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(json.dumps({k: summary[k] for k in ("device", "dump_images_per_sec", "forward_images_per_sec", "ratio_dump_over_forward")}, indent=2))
print(f"written to {results / 'gpu.json'}")
PY
if [[ -n "${OUT:-}" ]]; then cp "$RESULTS"/gpu*.json "$OUT"/; fi
step "done"
