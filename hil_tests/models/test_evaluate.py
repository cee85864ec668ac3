"""SKAB protocol on a generated directory in SKAB's CSV format, with known answers.

Needs tensorflow (training runs per file): FAILS, never skips, when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluate import SKAB_CHANNELS, evaluate_skab, pooled_metrics, read_skab_csv

HEADER = "datetime;" + ";".join(SKAB_CHANNELS) + ";anomaly;changepoint"


def _write(path: Path, x: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i, (row, lab) in enumerate(zip(x, labels, strict=True)):
        stamp = f"2020-03-09 10:{i // 60 % 60:02d}:{i % 60:02d}"
        lines.append(";".join([stamp, *(f"{v:.6f}" for v in row), f"{lab:.1f}", "0.0"]))
    path.write_text("\n".join(lines) + "\n")


def _run(
    rng: np.random.Generator, normal_test: int, anomalous: int
) -> tuple[np.ndarray, np.ndarray]:
    # 400 training rows; the normal test rows repeat training rows exactly (their scores are
    # training scores, below a quantile-1.0 threshold), then a gross offset on every sensor.
    base = rng.normal(size=(400, 8)) * 0.1 + np.arange(8)
    x = np.concatenate([base, base[:normal_test], base[:anomalous] + 100.0])
    labels = np.r_[np.zeros(400 + normal_test), np.ones(anomalous)]
    return x, labels


def test_pooled_metrics_known_counts() -> None:
    m = pooled_metrics(tp=6, fp=2, tn=8, fn=4)
    assert m["far"] == pytest.approx(0.2)
    assert m["mar"] == pytest.approx(0.4)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert pooled_metrics(0, 0, 5, 0)["f1"] == 0.0


def test_read_skab_csv(tmp_path: Path) -> None:
    x = np.arange(16.0).reshape(2, 8)
    _write(tmp_path / "a.csv", x, np.array([0.0, 1.0]))
    got, labels = read_skab_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(got, x)
    assert labels.tolist() == [0, 1]


def test_evaluate_skab_trivially_separable(tmp_path: Path) -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pytest.fail(
            "tensorflow is not installed: install the train extra (pip install -e '.[train]')"
        )
    rng = np.random.default_rng(0)
    _write(tmp_path / "valve1" / "0.csv", *_run(rng, normal_test=60, anomalous=40))
    _write(tmp_path / "valve1" / "1.csv", *_run(rng, normal_test=30, anomalous=20))
    # Normal-only data must not be evaluated.
    _write(tmp_path / "anomaly-free" / "anomaly-free.csv", *_run(rng, 10, 0))
    result = evaluate_skab(
        tmp_path, window=1, smooth=1, quantile=1.0, margin=1.5, epochs=30, hidden=(16, 4)
    )
    assert result["files"] == 2
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (60, 0, 90, 0)
    assert result["f1"] == 1.0 and result["far"] == 0.0 and result["mar"] == 0.0
    # SKAB's two temperatures enter as [dev, std]: 6 · 3 + 2 · 2 = 22 features.
    assert result["settings"]["detrend"] == (4, 5)
    assert result["weights_bytes"] == result["macs_per_inference"] == 22 * 16 * 2 + 64 * 2
    assert [f["file"] for f in result["per_file"]] == ["valve1/0.csv", "valve1/1.csv"]
    with pytest.raises(TypeError):
        evaluate_skab(tmp_path, no_such_setting=1)
