"""The accuracy benchmark's curve reading: plain's flatness and the views study's fitting signal."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accuracy  # noqa: E402


def test_flatness_looks_at_the_last_fifth_of_the_epochs():
    rising = [0.01 * e for e in range(1, 21)]  # +0.04 over the last 4 epochs
    assert accuracy.flatness(rising) == {"last_epochs": 4, "gain": rising[-1] - rising[-5], "flattened": False}
    plateau = [min(0.3, 0.05 * e) + 0.001 * e for e in range(1, 21)]
    assert accuracy.flatness(plateau)["flattened"] and accuracy.flatness(plateau)["gain"] > 0
    assert accuracy.mean_curve([[0.1, 0.3, 0.5], [0.3, 0.5]]) == [0.2, 0.4]


def test_fit_signal_finds_where_val_stops_rising_while_the_distillation_loss_still_falls():
    val = [min(0.4, 0.05 * e) for e in range(1, 21)]  # flat from epoch 8
    falling_kd = [2.0 - 0.08 * e for e in range(20)]
    fit = accuracy.fit_signal(val, falling_kd, mosaic_epochs=20, views=4)
    assert 6 <= fit["fit_epoch"] <= 10 and fit["fit_replays"] == fit["fit_epoch"] / 4 and fit["kd_drop_after"] > 0.1
    # the loss flat too: the student stopped learning altogether, it did not fit the cache
    assert accuracy.fit_signal(val, [1.0] * 20, mosaic_epochs=20, views=4)["fit_epoch"] is None
    # still rising at the end of the mosaic epochs: no fitting either
    assert accuracy.fit_signal([0.02 * e for e in range(20)], falling_kd, mosaic_epochs=20, views=4)["fit_epoch"] is None
    # the closing epochs (other views) are left out
    assert accuracy.fit_signal(val, falling_kd, mosaic_epochs=5, views=4)["fit_epoch"] is None
