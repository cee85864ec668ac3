"""Gateway-side model inference: the `[[models]]` of the config scored over the sample stream.

A `ModelRunner` assembles rows from the samples of its tags, scores each row exactly as a node
does (models.pipeline.StreamingScorer, the int8 network under LiteRT) and turns the score into
active/cleared events. The rules are in docs/edge.md, "Model inference".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.config.models import ModelConfig
from gateway.errors import ConfigError, ConfigProblem
from gateway.model import KIND_EVENT, Outgoing, Quality, Value

if TYPE_CHECKING:  # numpy and the model tooling are imported only once a model is configured
    from models.pipeline import Pipeline

__all__ = ["ModelRunner", "ModelStats", "Reconstructor", "load_runners"]

log = logging.getLogger("fogmesh.inference")

_GOOD = 0
_BAD = 1


class Reconstructor(Protocol):
    """The network as the scorer sees it: F standardized features in, F reconstructed out."""

    @property
    def n_in(self) -> int: ...

    @property
    def n_out(self) -> int: ...

    def reconstruct(self, z: Sequence[float]) -> list[float]: ...


@dataclass(slots=True)
class ModelStats:
    """Counters of one model since its runner was built; `stats()` hands out a snapshot."""

    samples: int = 0  # good numeric samples of the model's tags
    samples_bad: int = 0  # BAD, non-finite or non-numeric samples of the model's tags
    rows: int = 0  # complete rows (one sample of every tag)
    rows_dropped: int = 0  # complete rows with a bad value: not scored
    inferences: int = 0  # rows scored
    errors: int = 0  # rows whose inference raised
    events: int = 0
    time_s: float = 0.0  # spent scoring (features, network, score), wall clock
    last_score: float | None = None


class ModelRunner:
    """One `[[models]]` entry: rows from its tags → smoothed score → events.

    Build it with `ModelRunner.load(cfg)` (reads NAME.tflite and NAME.pipeline.json) or from a
    pipeline and any `Reconstructor`. Not thread-safe; the edge stage calls it from one loop.
    """

    def __init__(self, cfg: ModelConfig, pipeline: Pipeline, model: Reconstructor) -> None:
        from models.pipeline import StreamingScorer

        if len(cfg.tags) != len(pipeline.channels):
            raise ValueError(
                f"{len(cfg.tags)} tags for a pipeline of {len(pipeline.channels)} channels"
            )
        if not (model.n_in == model.n_out == pipeline.n_features):
            raise ValueError(
                f"the pipeline computes {pipeline.n_features} features, the network takes "
                f"{model.n_in} and gives {model.n_out}"
            )
        self.cfg = cfg
        self.name = cfg.name
        self.device = cfg.device
        self.tags: tuple[str, ...] = tuple(cfg.tags)
        self.pipeline = pipeline
        self.model = model
        self.threshold = pipeline.threshold
        self.clear_level = pipeline.threshold * cfg.clear_below
        self._scorer = StreamingScorer(pipeline, model.reconstruct)
        self._index = {t: i for i, t in enumerate(self.tags)}
        n = len(self.tags)
        # The row being assembled: per tag its latest sample since the last row.
        self._state: list[int | None] = [None] * n  # None: no sample yet; else _GOOD / _BAD
        self._values: list[float] = [0.0] * n
        self._ts: list[int] = [0] * n
        self._filled = 0
        self._bad = 0  # how many slots hold a bad sample
        self.active = False
        self._run = 0  # consecutive scores above the threshold while not active
        self._stats = ModelStats()
        self.last_error: str | None = None

    @classmethod
    def load(cls, cfg: ModelConfig, *, where: str = "models[?]") -> ModelRunner:
        """Read cfg.path and its pipeline; ConfigError at `where`.path / `where`.tags if unusable.

        A relative cfg.path resolves against the working directory (the loader has already
        made the paths of a config file absolute against its directory).
        """
        from models.errors import ModelError, ModelFormatError
        from models.litert import LiteRtModel
        from models.pipeline import Pipeline, pipeline_path

        path = Path(cfg.path)
        problems: list[ConfigProblem] = []
        model: LiteRtModel | None = None
        pipeline: Pipeline | None = None
        try:
            tflite = path.read_bytes()
        except OSError as exc:
            problems.append(ConfigProblem(f"{where}.path", f"cannot read '{path}': {_why(exc)}"))
        else:
            try:
                model = LiteRtModel(tflite)
            except ModelFormatError as exc:
                msg = f"'{path}' is not a usable int8 model: {exc}"
                problems.append(ConfigProblem(f"{where}.path", msg))
        ppath = pipeline_path(path)
        try:
            pipeline = Pipeline.load(ppath)
        except ModelError as exc:
            # Pipeline.load's messages start with the file's path already
            problems.append(ConfigProblem(f"{where}.path", f"pipeline {exc}"))
        except UnicodeDecodeError:
            problems.append(ConfigProblem(f"{where}.path", f"pipeline {ppath}: not UTF-8 text"))
        if pipeline is not None and len(cfg.tags) != len(pipeline.channels):
            msg = (
                f"{len(cfg.tags)} tags for the {len(pipeline.channels)} channels of "
                f"'{ppath}' ({', '.join(pipeline.channels)}); give one tag per channel, in order"
            )
            problems.append(ConfigProblem(f"{where}.tags", msg))
        if model is not None and pipeline is not None:
            f = pipeline.n_features
            if not (model.n_in == model.n_out == f):
                msg = (
                    f"'{ppath}' computes {f} features but '{path.name}' takes {model.n_in} "
                    f"inputs and gives {model.n_out} outputs"
                )
                problems.append(ConfigProblem(f"{where}.path", msg))
        if problems:
            raise ConfigError(problems)
        assert model is not None and pipeline is not None
        return cls(cfg, pipeline, model)

    # --- samples -----------------------------------------------------------------------

    def feed(
        self,
        tag: str,
        value: Value,
        ts_ms: int,
        *,
        quality: Quality = Quality.GOOD,
        out: list[Outgoing] | None = None,
    ) -> float | None:
        """Take one sample; return the smoothed score if it completed a row that was scored.

        Events the score causes are appended to `out`. A tag that is not the model's is ignored.
        """
        i = self._index.get(tag)
        if i is None:
            return None
        st = self._stats
        x: float | None = None
        if quality != Quality.BAD and isinstance(value, (int, float)):
            try:
                x = float(value)  # bool counts as 0 / 1, as in rules
            except OverflowError:
                x = None
            if x is not None and not math.isfinite(x):
                x = None
        state = self._state
        old = state[i]
        if old is None:
            self._filled += 1
        elif old == _BAD:
            self._bad -= 1
        if x is None:
            st.samples_bad += 1
            state[i] = _BAD
            self._bad += 1
        else:
            st.samples += 1
            state[i] = _GOOD
            self._values[i] = x
        self._ts[i] = ts_ms
        if self._filled < len(state):
            return None
        # Every tag has a sample since the last row: the row is complete.
        row_ms = max(self._ts)
        bad = self._bad
        for j in range(len(state)):
            state[j] = None
        self._filled = 0
        self._bad = 0
        st.rows += 1
        if bad:
            st.rows_dropped += 1
            return None
        return self._score(list(self._values), row_ms, out)

    def _score(self, row: list[float], ts_ms: int, out: list[Outgoing] | None) -> float | None:
        st = self._stats
        t0 = time.perf_counter()
        try:
            score = self._scorer.push(row)
        except Exception as exc:  # a runtime failure must not stop the edge stage
            st.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if st.errors == 1 or st.errors % 1000 == 0:
                log.warning("model %s: inference failed (%d so far): %s", self.name, st.errors, exc)
            return None
        finally:
            st.time_s += time.perf_counter() - t0
        st.inferences += 1
        st.last_score = score
        if self.active:
            if score <= self.clear_level:
                self.active = False
                self._event("cleared", score, ts_ms, out)
        elif score > self.threshold:
            self._run += 1
            if self._run >= self.cfg.for_samples:
                self.active = True
                self._run = 0
                self._event("active", score, ts_ms, out)
        else:
            self._run = 0
        return score

    def _event(self, state: str, score: float, ts_ms: int, out: list[Outgoing] | None) -> None:
        self._stats.events += 1
        if out is None:
            return
        out.append(
            Outgoing(
                self.device,
                KIND_EVENT,
                ts_ms,
                {
                    "model": self.name,
                    "tags": list(self.tags),
                    "state": state,
                    "score": score,
                    "threshold": self.threshold,
                    "clear_level": self.clear_level,
                    "severity": self.cfg.severity,
                },
            )
        )

    def stats(self) -> ModelStats:
        return replace(self._stats)


def load_runners(
    models: Sequence[ModelConfig],
    *,
    source: str = "",
    base_dir: Path | None = None,
    select: Callable[[ModelConfig], bool] | None = None,
) -> list[ModelRunner]:
    """Load the models (those `select` accepts, default all) in order; if any cannot be loaded,
    one ConfigError with the problems of all of them, at paths `models[i]...` (i counts in
    `models`). `base_dir` resolves relative paths (default: the working directory).
    """
    runners: list[ModelRunner] = []
    problems: list[ConfigProblem] = []
    chosen = [(i, m) for i, m in enumerate(models) if select is None or select(m)]
    if chosen:
        from models.errors import ModelError
        from models.litert import load_interpreter_class

        try:
            load_interpreter_class()
        except ModelError as exc:
            raise ConfigError([ConfigProblem("models", str(exc))], source) from exc
    for i, cfg in chosen:
        if base_dir is not None and not Path(cfg.path).is_absolute():
            cfg = cfg.model_copy(update={"path": str(base_dir / cfg.path)})
        try:
            runners.append(ModelRunner.load(cfg, where=f"models[{i}]"))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems, source)
    return runners


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
