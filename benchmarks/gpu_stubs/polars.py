"""A stand-in for polars on the GPU image, which lacks it (its wheel, about 54 MB, would nearly fill what a run may
carry). benchmarks/gpu.sh puts this folder on PYTHONPATH only there, and only when `import polars` fails.

Ultralytics' trainer imports polars in one place the benchmarks reach (plots are off in every run):
BaseTrainer.read_results_csv, called by save_model to put results.csv into each checkpoint's `train_results`,

    pl.read_csv(self.csv.read_bytes(), infer_schema_length=None).to_dict(as_series=False)

and that call alone is implemented here: the columns as lists, each typed as polars infers it (every value a whole
number: int; else every value a number: float; else str), an empty cell None. Nothing measured reads it: speed.py
times epochs from results.csv rows written before each save, and the timed `softlabel train` runs pay for it once
per epoch (a few rows of CSV, microseconds against an epoch). Anything else of polars fails loudly.
"""

from __future__ import annotations

import csv
import io

__version__ = "0.0-stub"


class DataFrame:
    def __init__(self, columns: dict[str, list]):
        self._columns = columns

    def to_dict(self, as_series: bool = True) -> dict[str, list]:
        if as_series:
            raise NotImplementedError("this polars stand-in returns plain lists only: to_dict(as_series=False)")
        return {name: list(values) for name, values in self._columns.items()}


def read_csv(source, infer_schema_length=None, **kwargs) -> DataFrame:
    """CSV bytes, text or a path -> a DataFrame of typed columns; the keyword arguments Ultralytics passes only."""
    if kwargs:
        raise NotImplementedError(f"this polars stand-in implements read_csv(source, infer_schema_length) only, not {sorted(kwargs)}")
    if isinstance(source, (bytes, bytearray)):
        text = bytes(source).decode("utf-8")
    elif hasattr(source, "read"):
        text = source.read()
        text = text.decode("utf-8") if isinstance(text, bytes) else text
    else:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return DataFrame({})
    header, body = rows[0], rows[1:]
    columns = {name: [row[i] if i < len(row) else "" for row in body] for i, name in enumerate(header)}
    return DataFrame({name: _typed(values) for name, values in columns.items()})


def _typed(values: list[str]) -> list:
    present = [v for v in values if v != ""]
    for kind in (int, float):
        try:
            for v in present:
                kind(v)
        except ValueError:
            continue
        return [kind(v) if v != "" else None for v in values]
    return [v if v != "" else None for v in values]
