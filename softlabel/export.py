"""Export a detector to ONNX or OpenVINO, optionally INT8, and compare FP32 with INT8 on size, CPU latency and mAP.

FP32 exports are Ultralytics' own. INT8:
- OpenVINO: Ultralytics' export (NNCF post-training quantization, head kept in floating point),
  calibrated on the training split.
- ONNX: ONNX Runtime static quantization done here rather than through Ultralytics' quantize=8,
  which keeps every calibration activation in memory until the end (memory grows with each image)
  and leaves everything but Conv in float, so no Conv is fused into an integer kernel (slower than
  FP32 on the digits demo's teacher: 107 vs 71 ms per image). Here
  weights are INT8 per output channel, activations INT8 per tensor, statistics are reduced every few
  images, and only the head's decoding (after the last conv of each branch) stays float: one INT8
  scale there would span box coordinates (0..imgsz) and class probabilities (0..1) and round every
  score to 0.

Every exported model is measured the same way: its file size, the median wall time of one
single-image prediction through Ultralytics (pre- and post-processing included) and mAP from
`YOLO(exported).val()` on the data's val split, both on square letterboxed inputs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from softlabel.errors import UserError

FORMATS = ("onnx", "openvino")
# module to import -> package to install, and the extra that brings them
RUNTIMES = {
    "onnx": ({"onnx": "onnx", "onnxslim": "onnxslim", "onnxruntime": "onnxruntime"}, "export"),
    "openvino": ({"openvino": "openvino"}, "openvino"),
}
CALIB_STATS_EVERY = 16  # calibration images between min/max reductions: bounds calibration memory


@dataclass
class ExportRow:
    precision: str  # fp32 or int8
    path: str
    size_mb: float
    latency_ms: float | None = None
    map50: float | None = None
    map50_95: float | None = None


@dataclass
class ExportReport:
    model: str
    format: str
    imgsz: int
    data: str | None
    calib_images: int | None
    latency_runs: int
    rows: list[ExportRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# -- checks -------------------------------------------------------------------------------------------


def check_format(fmt: str) -> str:
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise UserError(f"unsupported format '{fmt}': choose {' or '.join(FORMATS)}")
    return fmt


def check_runtime(fmt: str, int8: bool) -> None:
    """Refuse up front, naming the extra to install; Ultralytics would try to pip-install missing packages itself."""
    modules, extra = RUNTIMES[fmt]
    modules = dict(modules)
    if fmt == "openvino" and int8:
        modules["nncf"] = "nncf"
    missing = [pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None]
    if missing:
        names = "openvino/nncf" if fmt == "openvino" and int8 else "/".join(missing)
        raise UserError(f"{names} not installed: pip install softlabel[{extra}]")


def size_mb(path: str | Path) -> float:
    """A file's size, or a folder's total (OpenVINO writes a folder)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


@contextlib.contextmanager
def _ultralytics_errors(what: str) -> Iterator[None]:
    """Ultralytics states unsupported combinations with assertions and missing packages with ImportError."""
    try:
        yield
    except (AssertionError, ImportError, NotImplementedError) as e:
        line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"{what}: {line}") from None


# -- calibration images -------------------------------------------------------------------------------


def training_images(data: str) -> tuple[Path, ...]:
    from softlabel.data import build_index, load_data_yaml

    return build_index(load_data_yaml(data), "train", check_images=False).images


def calibration_images(data: str, count: int) -> list[Path]:
    """`count` training images spread evenly over the split (the whole split when it is smaller)."""
    if count < 1:
        raise UserError(f"--calib-images {count} must be at least 1")
    images = training_images(data)
    if len(images) <= count:
        return list(images)
    picks = np.linspace(0, len(images) - 1, count).round().astype(int)
    return [images[i] for i in picks]


def letterbox_input(path: Path, imgsz: int) -> np.ndarray:
    """One image as the exported model sees it in Ultralytics' predict: letterboxed, RGB, float [0, 1], NCHW."""
    import cv2
    from ultralytics.data.augment import LetterBox

    img = cv2.imread(str(path))
    if img is None:
        raise UserError(f"{path}: calibration image cannot be read")
    img = LetterBox((imgsz, imgsz), auto=False)(image=img)
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def _reader(images: list[Path], imgsz: int, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class LetterboxReader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            path = next(self.todo, None)
            return None if path is None else {input_name: letterbox_input(path, imgsz)}

        def rewind(self):
            self.todo = iter(images)

    return LetterboxReader()


# -- exports ------------------------------------------------------------------------------------------


def head_tail_nodes(graph, head_index: int) -> list[str]:
    """ONNX nodes of the Detect head's decoding: everything in the head's scope but the conv branches' hidden layers.

    The exporter names nodes by module path (/model.22/cv2.0/cv2.0.1/conv/Conv); the last conv of each
    branch writes the raw maps that the decoding reshapes, so it keeps a float output too.
    """
    scope = f"/model.{head_index}/"
    names = [n.name for n in graph.node]
    if not any(n.startswith(scope) for n in names):
        return [n.name for n in graph.node if n.op_type != "Conv"]  # unknown naming: quantize convs only
    produced_by = {o: n for n in graph.node for o in n.output}
    tail = set()
    for n in graph.node:
        if not n.name.startswith(scope):
            continue
        rest = n.name[len(scope):]
        if not rest.startswith(("cv2.", "cv3.")):
            tail.add(n.name)
            for i in n.input:  # the branch conv feeding the decoding
                src = produced_by.get(i)
                if src is not None and src.name.startswith(scope):
                    tail.add(src.name)
    return sorted(tail)


def quantize_onnx(fp32: Path, out: Path, images: list[Path], imgsz: int, head_index: int) -> Path:
    """Static INT8 (QDQ) quantization of an Ultralytics ONNX export, calibrated on `images`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32))
    input_name = model.graph.input[0].name
    exclude = head_tail_nodes(model.graph, head_index)
    # uint8 activations with int8 weights is the pair x86 CPUs run fast; reduce_range (7-bit weights) avoids the
    # overflow of that pair's multiply-add on CPUs without VNNI, which cost 0.025 mAP50-95 on the digits demo
    with _quiet_root_logger():
        quantize_static(
            str(fp32), str(out), _reader(images, imgsz, input_name),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, reduce_range=True, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
            extra_options={"CalibMaxIntermediateOutputs": CALIB_STATS_EVERY},
        )
    quantized = onnx.load(str(out))
    if not quantized.metadata_props:  # YOLO(path) reads names, stride and imgsz from there
        quantized.metadata_props.extend(model.metadata_props)
        onnx.save(quantized, str(out))
    return out


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger; the export prints its own summary."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def export_all(model: str | Path, fmt: str, out_dir: Path, imgsz: int, int8: bool, data: str | None,
               calib_images: int) -> dict[str, Path]:
    """FP32 (and INT8) exports of `model` into out_dir; returns {precision: path}."""
    from ultralytics import YOLO

    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / Path(model).name
    if Path(model).resolve() != pt.resolve():
        shutil.copy2(model, pt)  # Ultralytics writes exports beside the checkpoint; keep them out of the user's folder
    common = dict(format=fmt, imgsz=imgsz, batch=1, device="cpu", dynamic=False, verbose=False)
    paths = {}
    with _ultralytics_errors(f"{fmt} export"):
        paths["fp32"] = Path(YOLO(str(pt)).export(**common))
    if not int8:
        return paths
    images = calibration_images(data, calib_images)
    if fmt == "onnx":
        head_index = len(YOLO(str(pt)).model.model) - 1
        paths["int8"] = quantize_onnx(paths["fp32"], out_dir / f"{pt.stem}_int8.onnx", images, imgsz, head_index)
    else:
        train = len(training_images(data))
        with _ultralytics_errors(f"{fmt} INT8 export"):
            paths["int8"] = Path(YOLO(str(pt)).export(**common, quantize=8, data=str(data), split="train",
                                                      fraction=min(1.0, len(images) / train)))
    return paths


# -- measurements -------------------------------------------------------------------------------------


def measure_latency(path: str | Path, image: Path, imgsz: int, runs: int, warmup: int = 5) -> float:
    """Median milliseconds of one single-image prediction on the CPU, pre- and post-processing included.

    Square letterboxed input (rect=False) for every format: a static exported model takes nothing else,
    and a PyTorch model fed a smaller rectangle would look faster than it is.
    """
    import cv2
    from ultralytics import YOLO

    model = YOLO(str(path), task="detect")
    img = cv2.imread(str(image))
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model.predict(img, imgsz=imgsz, device="cpu", rect=False, verbose=False)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def validate(path: str | Path, data: str, imgsz: int, project: Path, name: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) of a model (any format) on the data's val split, on square inputs as in measure_latency.

    Ultralytics validates PyTorch models on minimal rectangles by default, which alone moved mAP50-95
    of one model from 0.053 to 0.079; every row here sees the same inputs.
    """
    from ultralytics import YOLO

    metrics = YOLO(str(path), task="detect").val(data=str(data), imgsz=imgsz, batch=1, rect=False, device="cpu", plots=False,
                                                 verbose=False, project=str(project.resolve()), name=name, exist_ok=True)
    return float(metrics.box.map50), float(metrics.box.map)


def first_val_image(data: str) -> Path:
    from softlabel.data import build_index, load_data_yaml

    spec = load_data_yaml(data)
    split = "val" if "val" in spec.splits else "train"
    return build_index(spec, split, check_images=False).images[0]


def run_export(model: str, fmt: str, int8: bool = False, data: str | None = None, imgsz: int | None = None,
               out: str | None = None, calib_images: int = 300, runs: int = 50) -> ExportReport:
    """Export, then measure every exported model. Bad input stops before anything is exported."""
    from softlabel.data import load_data_yaml
    from softlabel.prune import load_detector

    fmt = check_format(fmt)
    if int8 and not data:
        raise UserError("--int8 needs --data: INT8 calibration runs on the training images")
    if runs < 1:
        raise UserError(f"--runs {runs} must be at least 1")
    if data:
        load_data_yaml(data)
    detector, ckpt = load_detector(model)
    check_runtime(fmt, int8)
    imgsz = int(imgsz or (ckpt.get("train_args") or {}).get("imgsz") or 640)
    stride = int(max(detector.stride.tolist()))
    if imgsz < stride or imgsz % stride:
        raise UserError(f"--imgsz {imgsz} must be a positive multiple of the model's stride {stride}")
    out_dir = Path(out) if out else Path(model).parent / f"{Path(model).stem}_{fmt}"
    paths = export_all(model, fmt, out_dir, imgsz, int8, data, calib_images)
    report = ExportReport(model=str(model), format=fmt, imgsz=imgsz, data=str(data) if data else None,
                          calib_images=len(calibration_images(data, calib_images)) if int8 else None, latency_runs=runs)
    image = first_val_image(data) if data else None
    for precision, path in paths.items():
        row = ExportRow(precision=precision, path=str(path), size_mb=size_mb(path))
        if image is not None:
            with _ultralytics_errors(f"the installed {fmt} runtime cannot run the {precision.upper()} model"):
                row.latency_ms = measure_latency(path, image, imgsz, runs)
                row.map50, row.map50_95 = validate(path, data, imgsz, out_dir / "val", precision)
        report.rows.append(row)
    return report


def render(report: ExportReport) -> str:
    def num(v, width: int, digits: int) -> str:
        return ("-" if v is None else f"{v:.{digits}f}").rjust(width)

    head = f"{'precision':<11}{'size MB':>9}{'CPU ms/img':>12}{'mAP50':>8}{'mAP50-95':>10}  file"
    lines = [f"{report.format} export of {report.model} at imgsz {report.imgsz}", head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.precision.upper():<11}{r.size_mb:>9.2f}{num(r.latency_ms, 12, 1)}{num(r.map50, 8, 3)}"
                     f"{num(r.map50_95, 10, 3)}  {r.path}")
    lines.append("-" * len(head))
    if report.data:
        lines.append(f"CPU ms/img: median of {report.latency_runs} single-image predictions, pre/post-processing included; "
                     f"mAP on the val split of {report.data}")
    else:
        lines.append("no --data: latency and mAP not measured")
    if report.calib_images:
        lines.append(f"INT8 calibrated on {report.calib_images} training images")
    return "\n".join(lines)
