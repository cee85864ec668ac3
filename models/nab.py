"""Evaluate the deployed pipeline (int8, integer engine) on NAB's labelled anomaly windows.

NAB (../shared/datasets/README.md, numenta/NAB): each file is one `timestamp,value` series with
labelled anomaly windows. Protocol here, per file: the probationary period is the first
floor(0.15 · rows) rows; the detector (features, standardizer, model, threshold) is fitted on
those rows only, treated as normal; the whole file is scored causally, and only alarms after the
probationary period count. The same settings are used for every file; the labels are only read
to count, never to fit or tune.

Metrics per file (windows = the labelled windows with at least one row after probation):

- recall = windows with ≥ 1 counted alarm inside / windows;
- precision = detected windows / (detected windows + false-alarm events), a false-alarm event
  being a maximal run of consecutive counted alarm rows that contains no window row;
- the NAB score with the standard profile (A_TP = 1, A_FP = −0.11, A_FN = −1), following
  NAB's `sweeper.py`: a window scores A_TP · σ(p) / σ(−1) for its first counted alarm at
  relative position p = −(right − i + 1) / width (p = −1, worth A_TP, on the window's first
  row), or A_FN if it has none; every counted alarm row outside all windows (each row, not
  each run) scores |A_FP| · σ(d), d = (i − right) / (width − 1) for the closest window that
  ended before it (σ(d) = −1 when there is none; windows inside probation count here, as in
  NAB), where σ(x) = 2 / (1 + e^(5x)) − 1, and σ(x) = −1 for x > 3; normalized per file as
  100 · (S − S_null) / (S_perfect − S_null) with S_null = A_FN · windows (never alarms) and
  S_perfect = A_TP · windows (an alarm on every window's first row);
- `nab_score_onsets`, a secondary figure: the same NAB score of the alarm onsets only (the
  first row of each run of counted alarms), i.e. one detection per alarm event, which is what a
  node that reports by exception sends. NAB itself scores every alarm row (`nab_score`).

Where this differs from NAB's own code, on purpose or by necessity:

- probation is floor(0.15 · rows) (this project's rule); NAB's current sweeper.py caps it at
  0.15 · 5000 = 750 rows, so this fits on more rows than NAB's detectors see and counts fewer;
- NAB normalizes once over the corpus (sums of S, S_null, S_perfect over all files, counting
  every window of the label file); `nab_score` here is the mean of per-file scores, and
  `nab_score_corpus` the corpus-level figure over the scorable windows;
- NAB's sweeper enters a window on an exact timestamp match; here a window is every row with
  start ≤ timestamp ≤ end (as NAB's older `scorer.py` does), and a window with no rows is
  dropped; a one-row window (NAB divides by zero) puts the next FPs at d = 2;
- NAB sweeps a threshold over anomaly scores and reports the best per profile (tuned on the
  labels); here the detector's own threshold, calibrated on the probationary rows, is used.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from models.train import DetectorSettings, fit_detector

__all__ = [
    "NAB_DEFAULT_SETTINGS",
    "NAB_PROBATION_PERCENT",
    "STANDARD_PROFILE",
    "CostProfile",
    "alarm_onsets",
    "evaluate_nab",
    "nab_files",
    "nab_raw_score",
    "nab_score",
    "probationary_rows",
    "read_nab_csv",
    "read_windows",
    "scaled_sigmoid",
    "score_alarms",
    "window_metrics",
    "window_spans",
]

NAB_PROBATION_PERCENT = 0.15
NAB_DEFAULT_SETTINGS = DetectorSettings(window=12, smooth=12, holdout=0.25, margin=1.5)
_LABELS = Path("labels") / "combined_windows.json"
_SUBSET = "realKnownCause"

Span = tuple[int, int]  # first and last row of a window, inclusive


@dataclass(frozen=True)
class CostProfile:
    """NAB's cost matrix as positive weights (A_TP = tp_weight, A_FP = −fp_weight, ...)."""

    tp_weight: float = 1.0
    fp_weight: float = 0.11
    fn_weight: float = 1.0


STANDARD_PROFILE = CostProfile()


def read_nab_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n,) datetime64[us] timestamps and (n,) float values of a NAB file, in file order.

    Timestamps are not required to increase: NAB's machine_temperature_system_failure.csv
    repeats one hour (2014-01-07 02:00–02:55, rows 10151–10162), and NAB keeps file order.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or [h.strip() for h in lines[0].split(",")] != ["timestamp", "value"]:
        raise ValueError(f"{path}: not a NAB file (the header must be 'timestamp,value')")
    stamps: list[np.datetime64] = []
    values: list[float] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'timestamp,value', got {line!r}")
        try:
            stamps.append(np.datetime64(parts[0].strip(), "us"))
            values.append(float(parts[1]))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
        if not math.isfinite(values[-1]):
            raise ValueError(f"{path}:{number}: value {parts[1].strip()!r} is not finite")
    if not values:
        raise ValueError(f"{path}: no data rows")
    return np.array(stamps, dtype="datetime64[us]"), np.array(values, dtype=np.float64)


def read_windows(labels_json: Path, key: str) -> list[tuple[np.datetime64, np.datetime64]]:
    """The anomaly windows [start, end] of `key` in a NAB window label file, sorted."""
    labels_json = Path(labels_json)
    try:
        table = json.loads(labels_json.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{labels_json}: not JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise ValueError(f"{labels_json}: expected an object keyed by file")
    if key not in table:
        raise KeyError(f"{labels_json}: no windows for {key!r}")
    raw = table[key]
    if not isinstance(raw, list):
        raise ValueError(f"{labels_json}: {key}: expected a list of [start, end] windows")
    out: list[tuple[np.datetime64, np.datetime64]] = []
    for i, window in enumerate(raw):
        where = f"{labels_json}: {key}[{i}]"
        if not (isinstance(window, list) and len(window) == 2):
            raise ValueError(f"{where}: expected [start, end], got {window!r}")
        try:
            start, end = (np.datetime64(str(w).strip(), "us") for w in window)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if end < start:
            raise ValueError(f"{where}: ends before it starts")
        out.append((start, end))
    out.sort(key=lambda w: w[0])
    for i in range(1, len(out)):
        if out[i][0] <= out[i - 1][1]:
            raise ValueError(f"{labels_json}: {key}: windows overlap at {out[i][0]}")
    return out


def probationary_rows(n_rows: int, percent: float = NAB_PROBATION_PERCENT) -> int:
    """Rows of NAB's probationary period: floor(percent · rows)."""
    return math.floor(percent * n_rows)


def window_spans(
    timestamps: np.ndarray, windows: Sequence[tuple[np.datetime64, np.datetime64]]
) -> list[Span]:
    """Windows as inclusive row ranges, first to last row with start ≤ timestamp ≤ end.

    A window with no rows is dropped. Rows are taken in file order (timestamps need not
    increase), so a window spans from its first matching row to its last.
    """
    ts = np.asarray(timestamps, dtype="datetime64[us]")
    spans = []
    for start, end in windows:
        rows = np.flatnonzero((ts >= start) & (ts <= end))
        if rows.size:
            spans.append((int(rows[0]), int(rows[-1])))
    return spans


def _counted(alarms: np.ndarray, probation: int) -> np.ndarray:
    a = np.asarray(alarms, dtype=bool).copy()
    a[:probation] = False
    return a


def _in_windows(n: int, spans: Sequence[Span]) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for lo, hi in spans:
        mask[lo : hi + 1] = True
    return mask


def _scorable(spans: Sequence[Span], probation: int) -> list[Span]:
    return [(lo, hi) for lo, hi in spans if hi >= probation]


def alarm_onsets(alarms: np.ndarray, probation: int) -> np.ndarray:
    """The first row of each run of counted alarms (one event per run), as a bool array."""
    a = _counted(alarms, probation)
    out: np.ndarray = a & ~np.r_[False, a[:-1]]
    return out


def window_metrics(
    alarms: np.ndarray, spans: Sequence[Span], probation: int
) -> dict[str, int | float]:
    """windows, detected_windows, false_alarm_events and _rows, precision, recall of one file."""
    a = _counted(alarms, probation)
    windows = _scorable(spans, probation)
    detected = sum(1 for lo, hi in windows if a[lo : hi + 1].any())
    # Number the runs of alarm rows; a run with any row inside a window is not a false alarm.
    starts = alarm_onsets(a, 0)
    run_id = np.cumsum(starts) * a
    touching = np.unique(run_id[a & _in_windows(len(a), spans)])
    events = int(starts.sum()) - len(touching)
    return {
        "windows": len(windows),
        "detected_windows": detected,
        "false_alarm_events": events,
        "false_alarm_rows": int(np.sum(a & ~_in_windows(len(a), spans))),
        "precision": detected / (detected + events) if detected + events else 0.0,
        "recall": detected / len(windows) if windows else 0.0,
    }


def scaled_sigmoid(position: float) -> float:
    """NAB's weight of a detection at a relative position (−1 window start … 0 end … > 0 after)."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def nab_raw_score(
    alarms: np.ndarray,
    spans: Sequence[Span],
    probation: int,
    profile: CostProfile = STANDARD_PROFILE,
) -> float:
    """NAB's unnormalized score S of one file's alarms (see the module docstring)."""
    a = _counted(alarms, probation)
    max_tp = scaled_sigmoid(-1.0)
    score = 0.0
    for lo, hi in _scorable(spans, probation):
        hits = np.flatnonzero(a[lo : hi + 1])
        if hits.size:
            width = hi - lo + 1
            position = -(hi - (lo + int(hits[0])) + 1) / width
            score += scaled_sigmoid(position) * profile.tp_weight / max_tp
        else:
            score -= profile.fn_weight
    # Every alarm row outside the windows, weighted by its distance from the last window
    # that ended before it (windows inside the probationary period included, as in NAB).
    ordered = sorted(spans, key=lambda s: s[1])
    ends = np.array([hi for _, hi in ordered], dtype=np.int64)
    for i in np.flatnonzero(a & ~_in_windows(len(a), spans)):
        k = int(np.searchsorted(ends, i, side="left")) - 1
        if k < 0:
            weight = -1.0
        else:
            lo, hi = ordered[k]
            distance = (int(i) - hi) / (hi - lo) if hi > lo else 2.0
            weight = scaled_sigmoid(distance)
        score += weight * profile.fp_weight
    return score


def nab_score(
    alarms: np.ndarray,
    spans: Sequence[Span],
    probation: int,
    profile: CostProfile = STANDARD_PROFILE,
) -> float | None:
    """100 · (S − S_null) / (S_perfect − S_null): 0 never alarms, 100 perfect; None: no window."""
    windows = len(_scorable(spans, probation))
    if windows == 0:
        return None
    null = -profile.fn_weight * windows
    perfect = profile.tp_weight * windows
    return 100.0 * (nab_raw_score(alarms, spans, probation, profile) - null) / (perfect - null)


def score_alarms(
    alarms: np.ndarray,
    spans: Sequence[Span],
    probation: int,
    profile: CostProfile = STANDARD_PROFILE,
) -> dict[str, Any]:
    """window_metrics plus nab_raw, nab_score and nab_score_onsets of one file's alarms."""
    out: dict[str, Any] = dict(window_metrics(alarms, spans, probation))
    out["nab_raw"] = nab_raw_score(alarms, spans, probation, profile)
    out["nab_score"] = nab_score(alarms, spans, probation, profile)
    out["nab_score_onsets"] = nab_score(alarm_onsets(alarms, probation), spans, probation, profile)
    return out


def nab_files(data_dir: Path, labels: dict[str, Any]) -> list[str]:
    """Every data_dir/realKnownCause/*.csv that has windows in `labels`, as label keys, sorted."""
    keys = sorted(
        f"{_SUBSET}/{p.name}"
        for p in (Path(data_dir) / _SUBSET).glob("*.csv")
        if f"{_SUBSET}/{p.name}" in labels
    )
    if not keys:
        raise FileNotFoundError(
            f"no labelled NAB files ({_SUBSET}/*.csv with a key in {_LABELS}) under {data_dir}"
        )
    return keys


def _settings(overrides: dict[str, Any]) -> DetectorSettings:
    known = {f.name for f in fields(DetectorSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)} (known: {sorted(known)})")
    for key in ("hidden", "detrend"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(NAB_DEFAULT_SETTINGS, **overrides)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def evaluate_nab(
    data_dir: Path,
    *,
    progress: bool = False,
    files: list[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """NAB protocol over the labelled files; settings override NAB_DEFAULT_SETTINGS' fields.

    `files` are label keys (paths relative to data_dir, e.g. "realKnownCause/nyc_taxi.csv");
    by default every labelled file under data_dir/realKnownCause.
    """
    s = _settings(dict(settings))
    data_dir = Path(data_dir)
    labels_path = data_dir / _LABELS
    if not labels_path.is_file():
        raise FileNotFoundError(f"no NAB window labels at {labels_path}")
    labels = json.loads(labels_path.read_text())
    keys = nab_files(data_dir, labels) if files is None else list(files)
    if not keys:
        raise ValueError("files is empty: nothing to evaluate")
    for key in keys:
        if not (data_dir / key).is_file():
            raise FileNotFoundError(f"no NAB file {data_dir / key}")
    per_file: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    raw_total = 0.0
    t0 = time.monotonic()
    for i, key in enumerate(keys):
        ts, values = read_nab_csv(data_dir / key)
        spans = window_spans(ts, read_windows(labels_path, key))
        probation = probationary_rows(len(values))
        det = fit_detector(values[:probation, None], s, ["value"])
        # Score the whole file causally (counted rows keep their real history).
        m = score_alarms(det.alarms(values[:, None]), spans, probation)
        sizes = det.model.sizes()
        raw_total += m["nab_raw"]
        per_file.append(
            {
                "file": key,
                "rows": len(values),
                "probation_rows": probation,
                "windows": m["windows"],
                "detected_windows": m["detected_windows"],
                "false_alarm_events": m["false_alarm_events"],
                "false_alarm_rows": m["false_alarm_rows"],
                "precision": round(m["precision"], 4),
                "recall": round(m["recall"], 4),
                "nab_raw": round(m["nab_raw"], 4),
                "nab_score": _rounded(m["nab_score"]),
                "nab_score_onsets": _rounded(m["nab_score_onsets"]),
            }
        )
        if progress:
            score = "n/a" if m["nab_score"] is None else f"{m['nab_score']:.1f}"
            print(
                f"[{i + 1}/{len(keys)}] {key}: windows {m['detected_windows']}/{m['windows']} "
                f"false-alarm events {m['false_alarm_events']} precision={m['precision']:.3f} "
                f"recall={m['recall']:.3f} nab={score} ({time.monotonic() - t0:.0f} s)",
                file=sys.stderr,
            )
    windows = sum(f["windows"] for f in per_file)
    detected = sum(f["detected_windows"] for f in per_file)
    events = sum(f["false_alarm_events"] for f in per_file)
    precision = detected / (detected + events) if detected + events else 0.0
    recall = detected / windows if windows else 0.0
    scores = [f["nab_score"] for f in per_file if f["nab_score"] is not None]
    onsets = [f["nab_score_onsets"] for f in per_file if f["nab_score_onsets"] is not None]
    p = STANDARD_PROFILE
    corpus = (
        100.0 * (raw_total + p.fn_weight * windows) / ((p.tp_weight + p.fn_weight) * windows)
        if windows
        else None
    )
    return {
        "dataset": "nab",
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4)
        if precision + recall
        else 0.0,
        "nab_score": round(sum(scores) / len(scores), 4) if scores else None,
        "nab_score_corpus": _rounded(corpus),
        "nab_score_onsets": round(sum(onsets) / len(onsets), 4) if onsets else None,
        "files": len(keys),
        "windows": windows,
        "detected_windows": detected,
        "false_alarm_events": events,
        "probation_percent": NAB_PROBATION_PERCENT,
        "profile": asdict(STANDARD_PROFILE),
        **sizes,
        "settings": asdict(s),
        "per_file": per_file,
    }
