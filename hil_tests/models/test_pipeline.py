"""The pipeline document and the per-sample scorer against the batch computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.errors import ModelFormatError
from models.features import Standardizer, window_features
from models.pipeline import Pipeline, StreamingScorer, pipeline_path
from models.train import causal_mean

KINDS = (("value", "mean", "std"), ("dev", "std"))


def _pipeline(series: np.ndarray, window: int = 5, smooth: int = 4) -> Pipeline:
    std = Standardizer.fit(window_features(series, window, KINDS), clip=3.0)
    return Pipeline.fitted(["a", "b"], window, KINDS, std, smooth, threshold=0.7)


def test_streaming_scores_equal_the_batch_computation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) * [1.0, 5.0] + [0.0, 100.0]
    x[200:220, 1] += 40.0  # clipped features as well
    p = _pipeline(x[:100])

    def halve(z: list[float]) -> list[float]:  # any deterministic "network"
        return [v * 0.5 for v in z]

    scorer = StreamingScorer(p, halve)
    streamed = np.array([scorer.push(row) for row in x])
    z = p.features(x)
    assert np.abs(z).max() == pytest.approx(3.0)  # the clip was exercised
    batch = causal_mean(np.abs(z - z * 0.5).mean(1), p.smooth)
    np.testing.assert_allclose(streamed, batch, rtol=1e-12, atol=1e-12)
    scorer.reset()
    assert scorer.push(x[0]) == pytest.approx(batch[0])


def test_json_round_trip_and_path(tmp_path: Path) -> None:
    p = _pipeline(np.random.default_rng(1).normal(size=(50, 2)))
    f = pipeline_path(tmp_path / "pump.tflite")
    assert f.name == "pump.pipeline.json"
    p.save(f)
    assert Pipeline.load(f) == p
    assert json.loads(f.read_text())["format"] == "fogmesh-pipeline/1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not a pipeline document"),
        ({"window": 0}, "window and smooth must be ≥ 1"),
        ({"std": [1.0, 1.0, 0.0, 1.0, 1.0]}, "every std must be finite and > 0"),
        ({"mean": [0.0]}, "mean/std give 1/5 values for 5 features"),
        ({"kinds": [["value"], ["bogus"]]}, "unknown feature kind 'bogus'"),
        ({"threshold": float("nan")}, "threshold must be finite"),
        ({"channels": []}, "no channels"),
        ({"clip": "x"}, "invalid pipeline document"),
    ],
)
def test_bad_documents_are_refused_clearly(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    doc = _pipeline(np.random.default_rng(2).normal(size=(50, 2))).to_json()
    doc.update(change)
    f = tmp_path / "p.pipeline.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ModelFormatError, match=message):
        Pipeline.load(f)


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"missing\.json"):
        Pipeline.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelFormatError, match="not JSON"):
        Pipeline.load(tmp_path / "bad.json")


def test_a_row_of_the_wrong_width_is_refused() -> None:
    p = _pipeline(np.random.default_rng(3).normal(size=(50, 2)))
    with pytest.raises(ValueError, match="a row has 3 values, the pipeline 2 channels"):
        StreamingScorer(p, lambda z: z).push([1.0, 2.0, 3.0])
