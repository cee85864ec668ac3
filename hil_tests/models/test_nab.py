"""NAB protocol: window metrics and NAB score on hand-made alarms, the file readers, and one run
on a generated directory in NAB's layout.

The end-to-end test needs tensorflow (one training run): FAILS, never skips, when it is missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from models.nab import (
    STANDARD_PROFILE,
    alarm_onsets,
    evaluate_nab,
    nab_raw_score,
    nab_score,
    probationary_rows,
    read_nab_csv,
    read_windows,
    scaled_sigmoid,
    score_alarms,
    window_metrics,
    window_spans,
)

N = 100
PROBATION = 15
SPANS = [(30, 39), (60, 69)]


def _alarms(*rows: int | range) -> np.ndarray:
    a = np.zeros(N, dtype=bool)
    for r in rows:
        a[r if isinstance(r, range) else [r]] = True
    return a


def _stamp(i: int) -> str:
    # Hourly rows from 2014-01-01 00:00, in NAB's "YYYY-MM-DD hh:mm:ss" form.
    return str(np.datetime64("2014-01-01T00:00:00") + np.timedelta64(i, "h")).replace("T", " ")


def _write_csv(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,value", *(f"{_stamp(i)},{v:.6f}" for i, v in enumerate(values))]
    path.write_text("\n".join(lines) + "\n")


# -- window metrics ---------------------------------------------------------------------------


def test_window_hit_and_false_alarm_runs() -> None:
    # Probation alarms (5-7) ignored; one hit in window 1; two runs outside (45-47, 50); the
    # run 68-71 touches window 2, so it detects it and is no false alarm.
    a = _alarms(range(5, 8), 32, range(45, 48), 50, range(68, 72))
    m = window_metrics(a, SPANS, PROBATION)
    assert m == {
        "windows": 2,
        "detected_windows": 2,
        "false_alarm_events": 2,
        "false_alarm_rows": 6,  # 45-47, 50, and 70-71 (rows past window 2 are FP rows)
        "precision": 0.5,
        "recall": 1.0,
    }


def test_window_miss() -> None:
    m = window_metrics(_alarms(35), SPANS, PROBATION)
    assert (m["detected_windows"], m["false_alarm_events"], m["recall"]) == (1, 0, 0.5)
    assert m["precision"] == 1.0
    m = window_metrics(_alarms(), SPANS, PROBATION)
    assert (m["detected_windows"], m["precision"], m["recall"]) == (0, 0.0, 0.0)


def test_probationary_alarms_and_windows_ignored() -> None:
    # A window inside probation is not counted; an alarm in it detects nothing; a run that
    # starts in probation counts from the first row after it, once.
    spans = [(2, 8), *SPANS]
    m = window_metrics(_alarms(range(4, 7), range(10, 20)), spans, PROBATION)
    assert (m["windows"], m["detected_windows"], m["false_alarm_events"]) == (2, 0, 1)
    assert probationary_rows(7267) == 1090 and probationary_rows(100) == 15


# -- NAB score --------------------------------------------------------------------------------


def test_scaled_sigmoid_known_points() -> None:
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert scaled_sigmoid(3.5) == -1.0


def test_nab_perfect_and_null() -> None:
    assert nab_score(_alarms(30, 60), SPANS, PROBATION) == pytest.approx(100.0)
    # Only the first detection in a window counts: alarming on every window row is perfect too.
    assert nab_score(_alarms(range(30, 40), range(60, 70)), SPANS, PROBATION) == pytest.approx(
        100.0
    )
    assert nab_score(_alarms(), SPANS, PROBATION) == 0.0
    assert nab_raw_score(_alarms(), SPANS, PROBATION) == -2.0
    # Alarms in probation change nothing.
    assert nab_score(_alarms(range(0, 15)), SPANS, PROBATION) == 0.0
    assert nab_score(_alarms(50), [], PROBATION) is None


def test_nab_late_detection_and_false_positives() -> None:
    # Halfway into window 1 (width 10, row 35 → position −0.5), window 2 missed.
    tp = scaled_sigmoid(-0.5) / scaled_sigmoid(-1.0)
    assert nab_raw_score(_alarms(35), SPANS, PROBATION) == pytest.approx(tp - 1.0)
    # An FP with no window before it costs the full A_FP = −0.11 ...
    perfect = _alarms(30, 60)
    raw = nab_raw_score(perfect | _alarms(20), SPANS, PROBATION)
    assert raw == pytest.approx(2.0 - STANDARD_PROFILE.fp_weight)
    assert nab_score(perfect | _alarms(20), SPANS, PROBATION) == pytest.approx(
        100 * (4.0 - 0.11) / 4.0
    )
    # ... one just after a window less (row 40: d = 1/9), one far after the full cost.
    near = nab_raw_score(perfect | _alarms(40), SPANS, PROBATION)
    assert near == pytest.approx(2.0 + 0.11 * scaled_sigmoid(1 / 9))
    assert 2.0 - 0.11 < near < 2.0
    far = nab_raw_score(perfect | _alarms(99), SPANS, PROBATION)  # d = 30/9 > 3
    assert far == pytest.approx(2.0 - 0.11)
    # FPs count per row (NAB's rule), not per run.
    two = nab_raw_score(perfect | _alarms(20, 21), SPANS, PROBATION)
    assert two == pytest.approx(2.0 - 0.22)
    s = score_alarms(perfect | _alarms(20, 21), SPANS, PROBATION)
    assert s["false_alarm_events"] == 1 and s["nab_score"] < 100.0
    # The onset variant scores one detection per run: the 2-row FP run costs 0.11 once.
    assert s["nab_score_onsets"] == pytest.approx(100 * (4.0 - 0.11) / 4.0)


def test_alarm_onsets() -> None:
    a = _alarms(range(10, 20), range(30, 33), 35)
    assert np.flatnonzero(alarm_onsets(a, PROBATION)).tolist() == [15, 30, 35]


# -- readers ----------------------------------------------------------------------------------


def test_read_nab_csv_and_windows(tmp_path: Path) -> None:
    _write_csv(tmp_path / "a.csv", np.array([1.5, -2.0, 3.25, 4.0]))
    ts, values = read_nab_csv(tmp_path / "a.csv")
    assert values.tolist() == [1.5, -2.0, 3.25, 4.0]
    assert ts[1] == np.datetime64("2014-01-01T01:00:00")
    labels = tmp_path / "windows.json"
    labels.write_text(
        json.dumps(
            {
                "realKnownCause/a.csv": [
                    ["2014-01-01 02:00:00.000000", "2014-01-05 00:00:00.000000"],
                    ["2013-12-31 00:00:00.000000", "2014-01-01 00:30:00.000000"],
                ],
                "realKnownCause/b.csv": [],
            }
        )
    )
    windows = read_windows(labels, "realKnownCause/a.csv")
    assert windows[0][0] == np.datetime64("2013-12-31T00:00:00")  # sorted
    # Rows inside [start, end]; the end beyond the file is clipped to the last row.
    assert window_spans(ts, windows) == [(0, 0), (2, 3)]
    assert read_windows(labels, "realKnownCause/b.csv") == []
    with pytest.raises(KeyError, match="no windows for"):
        read_windows(labels, "realKnownCause/c.csv")


def test_repeated_timestamps_keep_file_order(tmp_path: Path) -> None:
    # NAB's machine_temperature file repeats an hour; rows stay in file order.
    path = tmp_path / "r.csv"
    path.write_text(
        "timestamp,value\n2014-01-07 02:00:00,1\n2014-01-07 02:55:00,2\n"
        "2014-01-07 02:00:00,3\n2014-01-07 03:00:00,4\n"
    )
    ts, values = read_nab_csv(path)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0]
    window = (np.datetime64("2014-01-07T02:50:00"), np.datetime64("2014-01-07T02:59:00"))
    assert window_spans(ts, [window]) == [(1, 1)]
    assert window_spans(ts, [(window[0], np.datetime64("2014-01-07T03:00:00"))]) == [(1, 3)]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "header"),
        ("time,value\n2014-01-01 00:00:00,1\n", "header"),
        ("timestamp,value\n", "no data rows"),
        ("timestamp,value\n2014-01-01 00:00:00,1,2\n", r":2: expected"),
        ("timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 01:00:00,x\n", r":3: could not"),
        ("timestamp,value\nyesterday,1\n", r":2: "),
        ("timestamp,value\n2014-01-01 00:00:00,nan\n", "not finite"),
    ],
)
def test_read_nab_csv_malformed(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_nab_csv(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{", "not JSON"),
        ("[]", "object"),
        ('{"k": [["2014-01-01 00:00:00"]]}', "expected \\[start, end\\]"),
        ('{"k": [["2014-01-02", "2014-01-01"]]}', "ends before"),
        ('{"k": [["soon", "2014-01-01"]]}', "k\\[0\\]"),
        ('{"k": [["2014-01-01", "2014-01-03"], ["2014-01-02", "2014-01-04"]]}', "overlap"),
    ],
)
def test_read_windows_malformed(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_windows(path, "k")


# -- end to end -------------------------------------------------------------------------------


def test_evaluate_nab_detects_injected_window(tmp_path: Path) -> None:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pytest.fail(
            "tensorflow is not installed: install the train extra (pip install -e '.[train]')"
        )
    with pytest.raises(FileNotFoundError, match="no NAB window labels"):
        evaluate_nab(tmp_path)
    rng = np.random.default_rng(0)
    n = 2000
    values = 10.0 + np.sin(np.arange(n) * 2 * math.pi / 50) + rng.normal(size=n) * 0.05
    values[1500:1540] += 8.0
    _write_csv(tmp_path / "realKnownCause" / "synthetic.csv", values)
    # Not labelled: not evaluated.
    _write_csv(tmp_path / "realKnownCause" / "unlabelled.csv", values[:100])
    (tmp_path / "labels").mkdir()
    labels = {"realKnownCause/synthetic.csv": [[_stamp(1490), _stamp(1560)]]}
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps(labels))
    with pytest.raises(TypeError):
        evaluate_nab(tmp_path, no_such_setting=1)

    result = evaluate_nab(tmp_path, epochs=30)

    assert result["dataset"] == "nab" and result["files"] == 1
    (f,) = result["per_file"]
    assert f["file"] == "realKnownCause/synthetic.csv"
    assert (f["rows"], f["probation_rows"], f["windows"], f["detected_windows"]) == (
        2000,
        300,
        1,
        1,
    )
    assert f["recall"] == 1.0 and result["recall"] == 1.0
    assert f["nab_score"] > 50.0
    assert result["nab_score"] == f["nab_score"] == result["nab_score_corpus"]
    for key in ("precision", "f1", "false_alarm_events", "nab_score_onsets", "model_bytes"):
        assert key in result
    assert result["weights_bytes"] == result["macs_per_inference"] == 3 * 16 * 2 + 64 * 2
    assert result["settings"]["window"] == 12 and result["settings"]["holdout"] == 0.25
    assert result["settings"]["epochs"] == 30
