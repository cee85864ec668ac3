"""Everything around the int8 network that a node or the gateway computes, as data.

A trained model is two files: `NAME.tflite` (the network, the source of truth for every weight
and quantization constant) and `NAME.pipeline.json` (this module: which features of which
channels, the standardizer, the score smoothing and the calibrated threshold). `fogmesh model
export` folds both into the firmware blob; the gateway reads both.

Per sample (one row of raw channel values, in `channels` order):

1. features — per channel the `kinds` (value, mean, std, dev) over the last `window` samples
   (fewer at the start), population std; see models/features.py;
2. z = (feature − mean) / std, clipped to ±clip;
3. the int8 network reconstructs z; raw score = mean |z − reconstruction| over the features;
4. score = mean of the last `smooth` raw scores (fewer at the start); alarm when > threshold.

`StreamingScorer` is the same computation one sample at a time in plain Python (the form the
gateway and the firmware use); `Pipeline.features` is the batch form in numpy. They agree to
float rounding, which a test checks.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ModelFormatError
from models.features import FEATURE_KINDS, Standardizer, window_features

__all__ = ["PIPELINE_FORMAT", "Pipeline", "StreamingScorer", "pipeline_path"]

PIPELINE_FORMAT = "fogmesh-pipeline/1"


def pipeline_path(tflite: Path) -> Path:
    """Where the pipeline of NAME.tflite lives: NAME.pipeline.json next to it."""
    return tflite.with_name(tflite.stem + ".pipeline.json")


@dataclass(frozen=True)
class Pipeline:
    channels: tuple[str, ...]
    window: int
    kinds: tuple[tuple[str, ...], ...]  # per channel
    mean: tuple[float, ...]  # per feature
    std: tuple[float, ...]
    clip: float
    smooth: int
    threshold: float

    def __post_init__(self) -> None:
        problems = []
        if not self.channels:
            problems.append("no channels")
        if len(self.kinds) != len(self.channels):
            problems.append(f"{len(self.kinds)} kinds lists for {len(self.channels)} channels")
        for ks in self.kinds:
            for k in ks:
                if k not in FEATURE_KINDS:
                    problems.append(f"unknown feature kind {k!r}")
        n = sum(len(ks) for ks in self.kinds)
        if n == 0:
            problems.append("no features")
        if len(self.mean) != n or len(self.std) != n:
            problems.append(
                f"mean/std give {len(self.mean)}/{len(self.std)} values for {n} features"
            )
        if any(not (math.isfinite(s) and s > 0) for s in self.std):
            problems.append("every std must be finite and > 0")
        if any(not math.isfinite(m) for m in self.mean):
            problems.append("every mean must be finite")
        if self.window < 1 or self.smooth < 1:
            problems.append("window and smooth must be ≥ 1")
        if not (math.isfinite(self.clip) and self.clip > 0):
            problems.append("clip must be finite and > 0")
        if not math.isfinite(self.threshold):
            problems.append("threshold must be finite")
        if problems:
            raise ModelFormatError("invalid pipeline: " + "; ".join(problems))

    @property
    def n_features(self) -> int:
        return len(self.mean)

    @classmethod
    def fitted(
        cls,
        channels: Sequence[str],
        window: int,
        kinds: Sequence[Sequence[str]],
        standardizer: Standardizer,
        smooth: int,
        threshold: float,
    ) -> Pipeline:
        return cls(
            tuple(channels),
            int(window),
            tuple(tuple(k) for k in kinds),
            tuple(float(v) for v in standardizer.mean),
            tuple(float(v) for v in standardizer.std),
            float(standardizer.clip),
            int(smooth),
            float(threshold),
        )

    @property
    def standardizer(self) -> Standardizer:
        return Standardizer(np.array(self.mean), np.array(self.std), self.clip)

    def features(self, series: np.ndarray) -> np.ndarray:
        """Batch: raw (n, C) series → standardized, clipped (n, F) features."""
        return self.standardizer.transform(window_features(series, self.window, self.kinds))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PIPELINE_FORMAT,
            "channels": list(self.channels),
            "window": self.window,
            "kinds": [list(k) for k in self.kinds],
            "mean": list(self.mean),
            "std": list(self.std),
            "clip": self.clip,
            "smooth": self.smooth,
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Pipeline:
        if not isinstance(doc, dict) or doc.get("format") != PIPELINE_FORMAT:
            raise ModelFormatError(f"not a pipeline document (format must be {PIPELINE_FORMAT!r})")
        try:
            return cls(
                tuple(str(c) for c in doc["channels"]),
                int(doc["window"]),
                tuple(tuple(str(k) for k in ks) for ks in doc["kinds"]),
                tuple(float(v) for v in doc["mean"]),
                tuple(float(v) for v in doc["std"]),
                float(doc["clip"]),
                int(doc["smooth"]),
                float(doc["threshold"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"invalid pipeline document: {exc!r}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Pipeline:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ModelFormatError(f"{path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"{path}: not JSON ({exc})") from exc
        try:
            return cls.from_json(doc)
        except ModelFormatError as exc:
            raise ModelFormatError(f"{path}: {exc}") from exc


class StreamingScorer:
    """One sample at a time: raw row → standardized features → (network) → smoothed score.

    `reconstruct` maps a list of F standardized features to F reconstructed ones (the int8
    network with its quantize/dequantize, whichever runtime). Plain Python floats, so it is
    also the reference for the firmware's implementation.
    """

    def __init__(
        self, pipeline: Pipeline, reconstruct: Callable[[list[float]], Sequence[float]]
    ) -> None:
        self.p = pipeline
        self._reconstruct = reconstruct
        self._hist: list[deque[float]] = [deque(maxlen=pipeline.window) for _ in pipeline.channels]
        self._scores: deque[float] = deque(maxlen=pipeline.smooth)

    def features(self, row: Sequence[float]) -> list[float]:
        p = self.p
        if len(row) != len(p.channels):
            raise ValueError(
                f"a row has {len(row)} values, the pipeline {len(p.channels)} channels"
            )
        out: list[float] = []
        for c, v in enumerate(row):
            h = self._hist[c]
            h.append(float(v))
            n = len(h)
            mean = sum(h) / n
            var = sum((x - mean) ** 2 for x in h) / n
            vals = {"value": float(v), "mean": mean, "std": math.sqrt(var), "dev": float(v) - mean}
            out.extend(vals[k] for k in p.kinds[c])
        return [
            min(p.clip, max(-p.clip, (f - m) / s))
            for f, m, s in zip(out, p.mean, p.std, strict=True)
        ]

    def push(self, row: Sequence[float]) -> float:
        """The smoothed score after this sample."""
        z = self.features(row)
        rec = self._reconstruct(z)
        raw = sum(abs(a - b) for a, b in zip(z, rec, strict=True)) / len(z)
        self._scores.append(raw)
        return sum(self._scores) / len(self._scores)

    def reset(self) -> None:
        for h in self._hist:
            h.clear()
        self._scores.clear()
