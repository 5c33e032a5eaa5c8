"""Does every module benchmarks/gpu.sh's Python steps import exist on the GPU image?

The GPU machine cannot install anything: what its image lacks must travel as wheels (gpu.sh's WHEELS) or, for
polars, as the stand-in in benchmarks/gpu_stubs/. A smoke run (SMOKE=1 bash benchmarks/gpu.sh) runs every step
with the folder `hook` writes on PYTHONPATH: its sitecustomize.py records, in every Python process the steps start
(DataLoader workers and other children included), the top-level name of each module imported for the first time
there. `check` then resolves each name in this environment and asserts that the distribution it comes from is in
the wheel list, in the GPU image's package list (GPU_IMAGE_PACKAGES), or stood in for (gpu_stubs); the standard
library and this checkout (softlabel, the benchmark scripts, the tests) are not counted. A name that does not
resolve here was an import that failed here (an optional dependency probed), and is not counted either.

What a smoke run on a CPU cannot see: modules imported only on CUDA code paths.

    python3 benchmarks/gpu_imports.py hook DIR                       write DIR/sitecustomize.py
    GPU_IMPORTS_LOG=LOGDIR PYTHONPATH=DIR:... python3 ...            record into LOGDIR (one file per process)
    python3 benchmarks/gpu_imports.py check LOGDIR WHEEL... [--csv-root DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "gpu_stubs"

# The Python packages of the GPU image ('cuda'), as its package list named them when last read (2026-11-17).
GPU_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()

HOOK = '''"""Written by benchmarks/gpu_imports.py: records the top-level name of every module a process imports for the
first time into $GPU_IMPORTS_LOG/<pid>.txt, then runs any other sitecustomize further down the path."""
import os as _os
import sys as _sys

_log = _os.environ.get("GPU_IMPORTS_LOG")
if _log:
    _seen = set(name.partition(".")[0] for name in _sys.modules)

    def _record(event, args, _seen=_seen, _log=_log):
        if event != "import" or not args or not isinstance(args[0], str):
            return
        top = args[0].partition(".")[0]
        if not top or top in _seen:
            return
        _seen.add(top)
        try:
            with open(_os.path.join(_log, f"{_os.getpid()}.txt"), "a") as f:
                f.write(top + "\\n")
        except OSError:
            pass

    _sys.addaudithook(_record)


def _chain():
    import importlib.machinery
    import importlib.util

    here = _os.path.dirname(_os.path.abspath(__file__))
    rest = [p for p in _sys.path if _os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_chain()
'''


def normalize(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(requirement: str) -> str:
    return normalize(re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0])


def write_hook(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sitecustomize.py"
    path.write_text(HOOK)
    return path


def recorded(log: Path) -> set[str]:
    names: set[str] = set()
    for f in log.glob("*.txt"):
        names.update(line.strip() for line in f.read_text().splitlines() if line.strip())
    return names


def _stdlib_paths() -> list[Path]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    return [Path(p).resolve() for p in paths]


def stand_ins() -> dict[str, str]:
    """Distribution -> the stand-in module that replaces it: each gpu_stubs module for its own distribution and for
    those the real one requires (a smoke run imports the real package where it is installed, and its parts)."""
    out = {}
    for f in sorted(STUBS.glob("*.py")):
        out[normalize(f.stem)] = f.stem
        try:
            requires = importlib.metadata.requires(f.stem) or []
        except importlib.metadata.PackageNotFoundError:
            requires = []
        out.update({wheel_name(r): f.stem for r in requires if "extra ==" not in r})
    return out


_DISTRIBUTIONS: dict[str, list[str]] | None = None


def distributions(name: str) -> list[str]:
    global _DISTRIBUTIONS
    if _DISTRIBUTIONS is None:
        _DISTRIBUTIONS = importlib.metadata.packages_distributions()
    return [normalize(d) for d in _DISTRIBUTIONS.get(name, [])]


def classify(name: str, wheels: set[str], image: set[str], stubs: dict[str, str]) -> tuple[str, str]:
    """(where it comes from, which distribution): stdlib, checkout, failed (not importable here), wheel, image,
    stand-in, or MISSING."""
    if name in sys.builtin_module_names or name in getattr(sys, "stdlib_module_names", ()) or name == "__main__":
        return "stdlib", ""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "failed", ""
    origin = spec.origin if spec.origin not in (None, "namespace") else next(iter(spec.submodule_search_locations or []), None)
    if origin in ("built-in", "frozen"):
        return "stdlib", ""
    where = Path(origin).resolve() if origin else None
    if where is not None and not {"site-packages", "dist-packages"} & set(where.parts):
        if where.is_relative_to(ROOT):  # softlabel, the benchmark scripts, the tests: they travel with the checkout
            return "checkout", ""
        if any(where.is_relative_to(p) for p in _stdlib_paths()):
            return "stdlib", ""
    dists = distributions(name)
    for d in dists:
        if d in stubs:
            return "stand-in", f"{d}: gpu_stubs/{stubs[d]}.py"
    for d in dists:
        if d in wheels:
            return "wheel", d
    for d in dists:
        if d in image:
            return "image", d
    return "MISSING", ",".join(dists) or f"no distribution found for {where}"


def check_stubs(csv_root: Path | None) -> list[str]:
    """Each stand-in against the real package where it is installed here: polars.read_csv on every results.csv
    under csv_root gives the same dictionary."""
    problems = []
    if csv_root is None or importlib.util.find_spec("polars") is None:
        return problems
    import polars as real

    spec = importlib.util.spec_from_file_location("polars_stand_in", STUBS / "polars.py")
    stub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stub)
    files = sorted(csv_root.rglob("results.csv"))
    for f in files:
        data = f.read_bytes()
        want = real.read_csv(data, infer_schema_length=None).to_dict(as_series=False)
        got = stub.read_csv(data, infer_schema_length=None).to_dict(as_series=False)
        if want != got:
            problems.append(f"gpu_stubs/polars.py reads {f} unlike polars")
    print(f"[gpu_imports] the polars stand-in read {len(files)} results.csv like polars" + ("" if not problems else ": NOT ALL"))
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    hook = sub.add_parser("hook", help="write DIR/sitecustomize.py, the recorder")
    hook.add_argument("dir", type=Path)
    check = sub.add_parser("check", help="check the recorded names against the wheel list and the image's packages")
    check.add_argument("log", type=Path, help="the folder GPU_IMPORTS_LOG named")
    check.add_argument("wheels", nargs="*", help="gpu.sh's WHEELS, name==version")
    check.add_argument("--csv-root", type=Path, default=None, help="check the polars stand-in on every results.csv below")
    args = p.parse_args()
    if args.cmd == "hook":
        print(write_hook(args.dir))
        return 0

    names = recorded(args.log)
    if not names:
        print(f"[gpu_imports] nothing recorded in {args.log}: was GPU_IMPORTS_LOG set and the hook on PYTHONPATH?")
        return 1
    wheels = {wheel_name(w) for w in args.wheels}
    image = {normalize(n) for n in GPU_IMAGE_PACKAGES}
    stubs = stand_ins()
    sys.path.append(str(ROOT / "tests"))  # where pytest found the test modules
    rows = {name: classify(name, wheels, image, stubs) for name in sorted(names)}
    third = {n: r for n, r in rows.items() if r[0] in ("wheel", "image", "stand-in", "MISSING")}
    width = max([len(n) for n in third] + [6])
    print(f"[gpu_imports] {len(names)} top-level modules imported by the steps; {len(third)} from outside the "
          f"standard library and this checkout ({sum(r[0] == 'failed' for r in rows.values())} probed and absent here):")
    for name, (where, dist) in third.items():
        print(f"  {name:<{width}}  {where:<8}  {dist}")
    missing = [n for n, r in third.items() if r[0] == "MISSING"]
    problems = [f"{n} ({third[n][1]}) is in neither the wheel list nor the GPU image" for n in missing]
    problems += check_stubs(args.csv_root)
    for line in problems:
        print(f"[gpu_imports] MISSING: {line}")
    if not problems:
        print(f"[gpu_imports] OK: every one is in the wheel list ({sum(r[0] == 'wheel' for r in third.values())}), "
              f"the GPU image ({sum(r[0] == 'image' for r in third.values())}) or stood in for "
              f"({sum(r[0] == 'stand-in' for r in third.values())})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
