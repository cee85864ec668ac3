"""Gateway-side model inference in the edge stage: rows, scores, events, counters, config errors.

The model is the committed tiny autoencoder (8 inputs) with a pipeline built here: the four
signals of a simulated pump, each with ("value", "mean") features, standardized on normal data
and a threshold calibrated on host scores of normal data.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import parse_config
from gateway.config.models import GatewayConfig, ModelConfig
from gateway.edge import EdgeStage
from gateway.errors import ConfigError, FogmeshError
from gateway.inference import ModelRunner, load_runners
from gateway.model import KIND_EVENT, Outgoing, Quality, Sample, Value
from hil_tests.tools.cli_runner import fogmesh
from models.features import window_features
from models.litert import LiteRtModel
from models.pipeline import Pipeline, StreamingScorer, pipeline_path
from models.train import TrainedModel

ROOT = Path(__file__).resolve().parents[2]
TFLITE = ROOT / "models" / "testdata" / "tiny_ae_int8.tflite"
DEV = "pump1"
TAGS = ["flow_m3h", "pressure_bar", "temperature_c", "vibration_mm_s"]
LEVEL = np.array([12.0, 5.0, 60.0, 2.0])
SPREAD = np.array([0.5, 0.1, 1.0, 0.2])
KINDS = (("value", "mean"),) * 4
WINDOW = 5
SMOOTH = 4
T0 = 1_700_000_000.0
PERIOD = 0.1

GOOD = Quality.GOOD
BAD = Quality.BAD


def normal(n: int, seed: int) -> np.ndarray:
    return LEVEL + SPREAD * np.random.default_rng(seed).normal(size=(n, 4))


def host_scores(pipeline: Pipeline, reconstruct: Any, rows: np.ndarray) -> list[float]:
    scorer = StreamingScorer(pipeline, reconstruct)
    return [scorer.push(row.tolist()) for row in rows]


def make_pipeline(threshold: float = 0.0) -> Pipeline:
    feats = window_features(normal(3000, seed=1), WINDOW, KINDS)
    mean, std = feats.mean(0), feats.std(0)
    return Pipeline(
        tuple(TAGS),
        WINDOW,
        KINDS,
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        8.0,
        SMOOTH,
        threshold,
    )


@dataclass(frozen=True)
class Trained:
    tflite: Path
    pipeline: Pipeline


@pytest.fixture(scope="module")
def calibrated() -> Pipeline:
    # The threshold: above every host score of normal data (LiteRT + StreamingScorer), as the
    # training tooling calibrates it (a high quantile times a margin).
    draft = make_pipeline()
    model = LiteRtModel(TFLITE.read_bytes())
    scores = host_scores(draft, model.reconstruct, normal(3000, seed=2))
    threshold = float(np.quantile(scores, 0.999)) * 1.5
    return make_pipeline(threshold)


@pytest.fixture
def trained(tmp_path: Path, calibrated: Pipeline) -> Trained:
    d = tmp_path / "models"
    d.mkdir()
    path = d / "pump.tflite"
    shutil.copyfile(TFLITE, path)
    calibrated.save(pipeline_path(path))
    return Trained(path, calibrated)


def config(tmp_path: Path, **model: Any) -> GatewayConfig:
    """A checked config (references and relative paths as `gateway check` sees them)."""
    entry = {"name": "pump-ae", "device": DEV, "tags": TAGS, "path": "models/pump.tflite"}
    entry.update(model)
    lines = ['[gateway]\nid = "gw1"\nsite = "plant"\n']
    lines.append(f'[[devices]]\nid = "{DEV}"\ntype = "simulated"\n')
    lines.append("[[models]]")
    for k, v in entry.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return parse_config("\n".join(lines) + "\n", base_dir=tmp_path, env={}).config


def poll(row: Sequence[float], ts: float, q: Sequence[Quality] | None = None) -> list[Sample]:
    qs = q or [GOOD] * len(TAGS)
    return [Sample(DEV, t, float(v), qq, ts) for t, v, qq in zip(TAGS, row, qs, strict=True)]


def run(stage: EdgeStage, rows: np.ndarray, start: int = 0) -> list[Outgoing]:
    out: list[Outgoing] = []
    for i, row in enumerate(rows):
        out += stage.process(poll(row, T0 + (start + i) * PERIOD))
    return out


def events(msgs: list[Outgoing]) -> list[Outgoing]:
    return [m for m in msgs if m.kind == KIND_EVENT]


def anomalous(n: int, seed: int) -> np.ndarray:
    rows = normal(n, seed)
    rows[:, 3] += 40 * SPREAD[3]  # vibration far outside anything seen in training
    return rows


# --- scoring and events --------------------------------------------------------------------


def test_normal_then_anomaly_then_normal(tmp_path: Path, trained: Trained) -> None:
    stage = EdgeStage(config(tmp_path))
    (runner,) = stage.models
    threshold = trained.pipeline.threshold
    assert runner.threshold == threshold > 0

    out = run(stage, normal(300, seed=10))
    assert events(out) == []
    st = stage.stats()
    assert (st.model_rows, st.model_inferences, st.model_rows_dropped) == (300, 300, 0)
    assert 0 <= (runner.stats().last_score or 0.0) <= threshold

    out = run(stage, anomalous(20, seed=11), start=300)
    (active,) = events(out)
    assert active.device == DEV
    # for_samples = 1: the first row above the threshold fires; its ts is the row's
    assert active.data["state"] == "active"
    assert active.data["model"] == "pump-ae"
    assert active.data["tags"] == TAGS
    assert active.data["score"] > threshold
    assert active.data["threshold"] == threshold == active.data["clear_level"]
    assert active.data["severity"] == "warning"
    assert T0 * 1000 + 300 * PERIOD * 1000 <= active.ts_ms < T0 * 1000 + 320 * PERIOD * 1000

    out = run(stage, normal(100, seed=12), start=320)
    (cleared,) = events(out)
    assert cleared.data["state"] == "cleared"
    assert cleared.data["score"] <= threshold
    assert cleared.ts_ms > active.ts_ms
    st = stage.stats()
    assert (st.model_rows, st.model_inferences, st.model_events) == (420, 420, 2)
    assert st.events_out == 2  # model events are events
    assert st.model_errors == st.model_samples_bad == 0
    assert 0 < st.model_time_s < 10
    assert stage.model_stats()["pump-ae"].inferences == 420


def test_scores_are_the_host_scores(tmp_path: Path, trained: Trained) -> None:
    # The runner's scores are StreamingScorer's with LiteRT; with the host integer engine
    # (bit-exact with TFLM, what a node runs) they are at most one output step apart.
    rows = np.concatenate([normal(100, seed=20), anomalous(10, seed=21), normal(40, seed=22)])
    runner = ModelRunner.load(ModelConfig.model_validate(_entry(trained.tflite)))
    got = []
    for i, row in enumerate(rows):
        scores = [runner.feed(t, float(v), i) for t, v in zip(TAGS, row, strict=True)]
        assert scores[:-1] == [None, None, None]
        got.append(scores[-1])
    litert = LiteRtModel(TFLITE.read_bytes())
    assert got == host_scores(trained.pipeline, litert.reconstruct, rows)
    host = TrainedModel.from_tflite(TFLITE.read_bytes())
    tflm = host_scores(trained.pipeline, lambda z: host.reconstruct(np.array([z]))[0], rows)
    assert np.abs(np.array(got) - np.array(tflm)).max() <= litert.output_scale


def test_for_samples_and_clear_below(tmp_path: Path, trained: Trained) -> None:
    quick = EdgeStage(config(tmp_path))
    slow = EdgeStage(config(tmp_path, name="slow", for_samples=3, clear_below=0.5))
    rows = np.concatenate([normal(100, seed=30), anomalous(15, seed=31), normal(60, seed=32)])
    e_quick = events(run(quick, rows))
    e_slow = events(run(slow, rows))
    assert [e.data["state"] for e in e_quick] == ["active", "cleared"]
    assert [e.data["state"] for e in e_slow] == ["active", "cleared"]
    # three rows in a row above the threshold before it fires ...
    assert e_slow[0].ts_ms - e_quick[0].ts_ms == round(2 * PERIOD * 1000)
    # ... and it clears only at or below half the threshold, later than the quick one
    assert e_slow[1].data["clear_level"] == pytest.approx(0.5 * trained.pipeline.threshold)
    assert e_slow[1].data["score"] <= 0.5 * trained.pipeline.threshold
    assert e_slow[1].ts_ms > e_quick[1].ts_ms


def test_a_row_above_the_threshold_alone_does_not_fire_with_for_samples(
    tmp_path: Path, trained: Trained
) -> None:
    runner = ModelRunner(
        ModelConfig.model_validate({**_entry(trained.tflite), "for_samples": 2}),
        _identity_pipeline(threshold=1.0),
        _Echo(),
    )
    out: list[Outgoing] = []
    # score = mean |z − z / 2| over four features = |z| / 8 with the echo model below
    for i, z in enumerate([16.0, 0.0, 16.0, 0.0, 16.0, 16.0, 16.0, 0.0]):
        runner.feed(TAGS[0], z, i, out=out)
        for t in TAGS[1:]:
            runner.feed(t, 0.0, i, out=out)
    assert [(e.data["state"], e.ts_ms) for e in out] == [("active", 5), ("cleared", 7)]


# --- rows: bad and missing samples ---------------------------------------------------------


class _Echo:
    """A Reconstructor that returns half of each feature and records what it was given."""

    n_in = 4
    n_out = 4

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def reconstruct(self, z: Sequence[float]) -> list[float]:
        self.seen.append(list(z))
        return [v / 2 for v in z]


def _identity_pipeline(threshold: float = 1e9) -> Pipeline:
    # one "value" feature per channel, mean 0, std 1, window 1, smooth 1: z is the row itself
    return Pipeline(tuple(TAGS), 1, (("value",),) * 4, (0.0,) * 4, (1.0,) * 4, 1e6, 1, threshold)


def _entry(path: Path) -> dict[str, Any]:
    return {"name": "m", "device": DEV, "tags": TAGS, "path": str(path)}


def _echo_runner() -> tuple[ModelRunner, _Echo]:
    echo = _Echo()
    cfg = ModelConfig.model_validate(_entry(Path("unused.tflite")))
    return ModelRunner(cfg, _identity_pipeline(), echo), echo


def _feed(runner: ModelRunner, items: list[tuple[str, Value, int, Quality]]) -> list[float | None]:
    return [runner.feed(t, v, ts, quality=q) for t, v, ts, q in items]


def test_a_row_is_one_new_sample_of_every_tag() -> None:
    runner, echo = _echo_runner()
    a, b, c, d = TAGS
    got = _feed(
        runner,
        [
            (a, 1.0, 0, GOOD),
            (b, 2.0, 0, GOOD),
            (c, 3.0, 0, GOOD),
            (d, 4.0, 0, GOOD),  # row 1
            (a, 5.0, 1, GOOD),
            (a, 6.0, 2, GOOD),  # a newer sample replaces the pending one
            (b, 7.0, 2, GOOD),
            (c, 8.0, 2, GOOD),
            (d, 9.0, 2, GOOD),  # row 2
            ("not-mine", 1.0, 2, GOOD),
        ],
    )
    assert echo.seen == [[1.0, 2.0, 3.0, 4.0], [6.0, 7.0, 8.0, 9.0]]
    assert [g is not None for g in got] == [False] * 3 + [True] + [False] * 4 + [True, False]
    assert got[3] == pytest.approx((1 + 2 + 3 + 4) / 2 / 4)
    st = runner.stats()
    assert (st.samples, st.rows, st.inferences, st.samples_bad) == (9, 2, 2, 0)


def test_a_bad_sample_drops_its_row_and_no_value_is_reused() -> None:
    runner, echo = _echo_runner()
    a, b, c, d = TAGS
    _feed(
        runner,
        [
            # poll 1: b is bad; the row completes with it and is dropped, not scored
            (a, 1.0, 0, GOOD),
            (b, 2.0, 0, BAD),
            (c, 3.0, 0, GOOD),
            (d, 4.0, 0, GOOD),
            # poll 2: every value fresh
            (a, 5.0, 1, GOOD),
            (b, 6.0, 1, GOOD),
            (c, 7.0, 1, GOOD),
            (d, 8.0, 1, GOOD),
            # poll 3: c is NaN, d is a string: both bad, the row is dropped
            (a, 9.0, 2, GOOD),
            (b, 10.0, 2, GOOD),
            (c, float("nan"), 2, GOOD),
            (d, "offline", 2, GOOD),
            # poll 4: c arrives bad, then good again before the row completes: the newest counts
            (c, 11.0, 3, BAD),
            (a, 12.0, 3, GOOD),
            (b, 13.0, 3, GOOD),
            (c, 14.0, 3, GOOD),
            (d, True, 3, GOOD),  # bool as 0 / 1, as in rules
        ],
    )
    assert echo.seen == [[5.0, 6.0, 7.0, 8.0], [12.0, 13.0, 14.0, 1.0]]
    st = runner.stats()
    assert (st.rows, st.rows_dropped, st.inferences, st.samples_bad) == (4, 2, 2, 4)


def test_an_inference_error_is_counted_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(_Echo):
        def reconstruct(self, z: Sequence[float]) -> list[float]:
            raise RuntimeError("invoke failed")

    cfg = ModelConfig.model_validate(_entry(Path("unused.tflite")))
    runner = ModelRunner(cfg, _identity_pipeline(), Broken())
    for i in range(3):
        for t in TAGS:
            assert runner.feed(t, 1.0, i) is None
    st = runner.stats()
    assert (st.rows, st.inferences, st.errors) == (3, 0, 3)
    assert runner.last_error == "RuntimeError: invoke failed"
    assert "model m: inference failed (1 so far): invoke failed" in caplog.text


def test_bad_samples_through_the_stage(tmp_path: Path, trained: Trained) -> None:
    stage = EdgeStage(config(tmp_path))
    rows = normal(10, seed=40)
    out = stage.process(poll(rows[0], T0, [GOOD, BAD, GOOD, GOOD]))
    out += stage.process(poll(rows[1], T0 + 0.1))
    out += stage.process([Sample(DEV, "vibration_mm_s", float("inf"), GOOD, T0 + 0.2)])
    assert events(out) == []
    st = stage.stats()
    assert (st.model_rows, st.model_rows_dropped, st.model_inferences) == (2, 1, 1)
    assert (st.model_samples_bad, st.samples_bad) == (2, 2)


def test_rule_and_model_events_come_in_sample_order(tmp_path: Path, trained: Trained) -> None:
    text = (
        '[gateway]\nid = "gw1"\nsite = "plant"\n'
        f'[[devices]]\nid = "{DEV}"\ntype = "simulated"\n'
        f'[[rules]]\nname = "vib"\ndevice = "{DEV}"\ntag = "vibration_mm_s"\nabove = 4.0\n'
        f'[[models]]\nname = "ae"\ndevice = "{DEV}"\ntags = {json.dumps(TAGS)}\n'
        'path = "models/pump.tflite"\n'
    )
    stage = EdgeStage(parse_config(text, base_dir=tmp_path).config)
    run(stage, normal(50, seed=50))
    out = run(stage, anomalous(5, seed=51), start=50)
    # vibration is the last tag of a poll: the rule fires on it, then the row completes
    assert [(m.data.get("rule"), m.data.get("model")) for m in events(out)] == [
        ("vib", None),
        (None, "ae"),
    ]
    assert stage.stats().events_out == 2


# --- config --------------------------------------------------------------------------------


def test_relative_path_resolves_against_the_config_directory(
    tmp_path: Path, trained: Trained
) -> None:
    cfg = config(tmp_path)
    (m,) = cfg.models
    assert m.path == str(tmp_path / "models" / "pump.tflite")
    assert (m.severity, m.clear_below, m.for_samples) == ("warning", 1.0, 1)


def test_unbound_models_are_not_loaded(tmp_path: Path) -> None:
    # A stage holding part of a config (another device) neither loads nor feeds the model.
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw1", "site": "plant"},
            "devices": [{"id": DEV, "type": "simulated", "enabled": False}],
            "models": [_entry(tmp_path / "missing.tflite")],
        }
    )
    stage = EdgeStage(cfg)
    assert stage.unbound_models == ("m",)
    assert stage.models == ()
    assert stage.model_stats() == {}


def _load_problems(tmp_path: Path, **model: Any) -> list[str]:
    cfg = config(tmp_path, **model)
    with pytest.raises(ConfigError) as exc:
        EdgeStage(cfg)
    assert isinstance(exc.value, FogmeshError)
    return [str(p) for p in exc.value.problems]


def test_missing_model_file(tmp_path: Path, trained: Trained) -> None:
    trained.tflite.unlink()
    assert _load_problems(tmp_path) == [
        f"models[0].path: cannot read '{trained.tflite}': No such file or directory"
    ]


def test_missing_pipeline_file(tmp_path: Path, trained: Trained) -> None:
    pipeline_path(trained.tflite).unlink()
    (problem,) = _load_problems(tmp_path)
    assert problem == (
        f"models[0].path: pipeline {pipeline_path(trained.tflite)}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"{", "not JSON"), (b"\xff\xfe", "not UTF-8 text"), (b"{}", "not a pipeline document")],
)
def test_bad_pipeline_file(tmp_path: Path, trained: Trained, content: bytes, reason: str) -> None:
    pipeline_path(trained.tflite).write_bytes(content)
    (problem,) = _load_problems(tmp_path)
    assert problem.startswith(f"models[0].path: pipeline {pipeline_path(trained.tflite)}: ")
    assert reason in problem


def test_not_a_model(tmp_path: Path, trained: Trained) -> None:
    trained.tflite.write_bytes(b"\0" * 64)
    (problem,) = _load_problems(tmp_path)
    assert problem.startswith(f"models[0].path: '{trained.tflite}' is not a usable int8 model: ")


def test_pipeline_width_mismatch(tmp_path: Path, trained: Trained) -> None:
    three = Pipeline(tuple(TAGS[:3]), 1, (("value",),) * 3, (0.0,) * 3, (1.0,) * 3, 8.0, 1, 1.0)
    three.save(pipeline_path(trained.tflite))
    ppath = pipeline_path(trained.tflite)
    assert _load_problems(tmp_path) == [
        f"models[0].tags: 4 tags for the 3 channels of '{ppath}' "
        "(flow_m3h, pressure_bar, temperature_c); give one tag per channel, in order",
        f"models[0].path: '{ppath}' computes 3 features but 'pump.tflite' takes 8 inputs "
        "and gives 8 outputs",
    ]


def test_every_model_problem_is_reported_together(tmp_path: Path, trained: Trained) -> None:
    cfg = config(tmp_path)
    good = cfg.models[0]
    missing = good.model_copy(update={"name": "gone", "path": str(tmp_path / "gone.tflite")})
    bad = cfg.model_copy(update={"models": [good, missing, missing]})
    with pytest.raises(ConfigError) as exc:
        EdgeStage(bad)
    paths = [p.path for p in exc.value.problems]
    assert paths == ["models[1].path", "models[1].path", "models[2].path", "models[2].path"]
    with pytest.raises(ConfigError, match=r"^gw\.toml: models\[1\]\.path: cannot read"):
        load_runners(bad.models, source="gw.toml")


def test_relative_path_in_python_resolves_against_base_dir(
    tmp_path: Path, trained: Trained
) -> None:
    cfg = GatewayConfig.model_validate(
        {
            "gateway": {"id": "gw1", "site": "plant"},
            "devices": [{"id": DEV, "type": "simulated"}],
            "models": [{**_entry(Path("models/pump.tflite"))}],
        }
    )
    assert len(EdgeStage(cfg, base_dir=tmp_path).models) == 1


HEAD = f'[gateway]\nid = "gw1"\nsite = "plant"\n[[devices]]\nid = "{DEV}"\ntype = "simulated"\n'


def _problems(models: str, head: str = HEAD) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(head + models, env={})
    return [str(p) for p in exc.value.problems]


M = '[[models]]\nname = "ae"\ndevice = "pump1"\npath = "m.tflite"\n'
SIGNALS = "flow_m3h, pressure_bar, temperature_c, vibration_mm_s"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            M + 'tags = ["flow_m3h", "nope"]\n',
            [f"models[0].tags[1]: device 'pump1' has no tag 'nope'; tags are: {SIGNALS}"],
        ),
        (
            M.replace('"pump1"', '"pump9"') + 'tags = ["flow_m3h"]\n',
            ["models[0].device: no device 'pump9'; devices are: pump1"],
        ),
        (
            M + 'tags = ["flow_m3h", "flow_m3h"]\n',
            ["models[0].tags[1]: duplicate tag 'flow_m3h' (also models[0].tags[0])"],
        ),
        (
            M + 'tags = ["flow_m3h"]\n' + M + 'tags = ["flow_m3h"]\n',
            ["models[1].name: duplicate model name 'ae' (also models[0])"],
        ),
        (M + "tags = []\n", ["models[0].tags: give at least one tag"]),
        (M, ["models[0].tags: required"]),
        (
            M + 'tags = ["flow_m3h"]\nclear_below = 0\nfor_samples = 0\nseverity = "high"\n',
            [
                "models[0].severity: must be one of 'info', 'warning', 'critical'",
                "models[0].clear_below: must be greater than 0 and 1 or less",
                "models[0].for_samples: must be 1..1000000",
            ],
        ),
        (
            M.replace('"m.tflite"', '""') + 'tags = ["flow_m3h"]\n',
            ["models[0].path: must not be empty"],
        ),
        (
            M + 'tags = ["flow_m3h"]\nthreshold = 3.0\n',
            [
                "models[0].threshold: unknown key 'threshold'; expected one of: "
                "name, device, tags, path, severity, clear_below, for_samples"
            ],
        ),
        (
            '[models]\nname = "ae"\n',
            ["models: must be an array of tables: write [[models]], not [models]"],
        ),
    ],
    ids=[
        "unknown tag",
        "unknown device",
        "duplicate tag",
        "duplicate name",
        "no tags",
        "tags missing",
        "ranges",
        "empty path",
        "unknown key",
        "not an array",
    ],
)
def test_bad_models_entries(toml: str, expected: list[str]) -> None:
    assert _problems(toml) == expected


def test_model_on_a_disabled_device() -> None:
    text = M + 'tags = ["flow_m3h"]\n'
    assert _problems(text, head=HEAD + "enabled = false\n") == [
        "models[0].device: device 'pump1' is disabled; enable it or remove the model"
    ]


def test_gateway_check_reports_a_bad_models_entry(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(HEAD + M + 'tags = ["flow_m3h", "nope"]\nfor_samples = 0\n')
    r = fogmesh("gateway", "check", str(cfg))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"{cfg}: models[0].for_samples: must be 1..1000000",
        f"{cfg}: 1 problem(s)",
    ]
    # references are checked once the structure is valid
    cfg.write_text(HEAD + M + 'tags = ["flow_m3h", "nope"]\n')
    r = fogmesh("gateway", "check", str(cfg))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"{cfg}: models[0].tags[1]: device 'pump1' has no tag 'nope'; tags are: {SIGNALS}",
        f"{cfg}: 1 problem(s)",
    ]
    assert "Traceback" not in r.stderr


def test_docs_describe_every_models_key() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    section = text.split("## `[[models]]`", 1)[1].split("\n## ", 1)[0]
    keys = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert keys == set(ModelConfig.model_fields)
