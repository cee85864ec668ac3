"""Evaluate the deployed pipeline (int8, integer engine) with SKAB's protocol.

SKAB (../shared/datasets/README.md): for each run file, fit features, standardizer, model and
threshold on its first 400 rows (normal operation), then score the remaining rows; pool the
point labels of all files and report F1, FAR = FP / (FP + TN) and MAR = FN / (FN + TP). The same
settings are used for every file; the labels are only read to count, never to fit or tune.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from models.train import DetectorSettings, fit_detector

__all__ = [
    "SKAB_CHANNELS",
    "SKAB_DETREND",
    "SKAB_TRAIN_ROWS",
    "evaluate_skab",
    "pooled_metrics",
    "read_skab_csv",
]

SKAB_CHANNELS = (
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
)
SKAB_TRAIN_ROWS = 400
# The pump's two temperatures warm up through a run (in anomaly-free.csv the thermocouple ends
# 3.6 σ on average from its first 400 rows): they enter by their movement only.
SKAB_DETREND = ("Temperature", "Thermocouple")


def read_skab_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) float sensor values and (n,) 0/1 anomaly labels of one SKAB run file."""
    lines = path.read_text().splitlines()
    header = [h.strip() for h in lines[0].split(";")]
    try:
        cols = [header.index(c) for c in SKAB_CHANNELS]
        label = header.index("anomaly")
    except ValueError as exc:
        raise ValueError(f"{path}: not a SKAB file ({exc})") from exc
    rows = [line.split(";") for line in lines[1:] if line.strip()]
    x = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64)
    y = np.array([float(r[label]) for r in rows]) > 0.5
    return x, y.astype(np.int8)


def skab_files(data_dir: Path) -> list[Path]:
    """Every labelled run file under data_dir (anomaly-free/ excluded), sorted."""
    files = sorted(
        p
        for p in Path(data_dir).rglob("*.csv")
        if "anomaly-free" not in p.relative_to(data_dir).parts
    )
    if not files:
        raise FileNotFoundError(f"no SKAB run files (*.csv) under {data_dir}")
    return files


def pooled_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "far": fp / (fp + tn) if fp + tn else 0.0,
        "mar": fn / (fn + tp) if fn + tp else 0.0,
        "precision": prec,
        "recall": rec,
    }


def evaluate_skab(data_dir: Path, *, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """SKAB protocol over every run file under data_dir; settings are DetectorSettings fields."""
    known = {f.name for f in fields(DetectorSettings)}
    unknown = set(settings) - known
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)} (known: {sorted(known)})")
    for key in ("hidden", "detrend"):
        if key in settings:
            settings[key] = tuple(settings[key])
    settings.setdefault("detrend", tuple(SKAB_CHANNELS.index(c) for c in SKAB_DETREND))
    s = DetectorSettings(**settings)
    files = skab_files(Path(data_dir))
    tp = fp = tn = fn = 0
    sizes: dict[str, int] = {}
    per_file = []
    t0 = time.monotonic()
    for i, path in enumerate(files):
        x, y = read_skab_csv(path)
        if len(x) <= SKAB_TRAIN_ROWS:
            raise ValueError(f"{path}: {len(x)} rows, need more than {SKAB_TRAIN_ROWS}")
        det = fit_detector(x[:SKAB_TRAIN_ROWS], s, SKAB_CHANNELS)
        # Score the whole run causally (the test rows keep their real history), count the rest.
        pred = det.alarms(x)[SKAB_TRAIN_ROWS:]
        lab = y[SKAB_TRAIN_ROWS:].astype(bool)
        c = (
            int(np.sum(pred & lab)),
            int(np.sum(pred & ~lab)),
            int(np.sum(~pred & ~lab)),
            int(np.sum(~pred & lab)),
        )
        tp, fp, tn, fn = tp + c[0], fp + c[1], tn + c[2], fn + c[3]
        sizes = det.model.sizes()
        name = str(path.relative_to(data_dir))
        per_file.append({"file": name, "tp": c[0], "fp": c[1], "tn": c[2], "fn": c[3]})
        if progress:
            m = pooled_metrics(*c)
            print(
                f"[{i + 1}/{len(files)}] {name}: f1={m['f1']:.3f} far={m['far']:.3f} "
                f"mar={m['mar']:.3f} ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
            )
    metrics = pooled_metrics(tp, fp, tn, fn)
    return {
        "dataset": "skab",
        **{k: round(v, 4) for k, v in metrics.items()},
        "files": len(files),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        **sizes,
        "settings": asdict(s),
        "per_file": per_file,
    }
