"""`fogmesh demo` end to end, and `fogmesh fog tail` on the fog store it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hil_tests.tools.cli_runner import fogmesh


@pytest.mark.slow
def test_demo_reports_every_injected_anomaly_and_loses_nothing(tmp_path: Path) -> None:
    r = fogmesh("demo", "--seconds", "15", "--json", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)  # stdout holds the JSON object and nothing else
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["anomalies_injected"] == 4  # the flow collapse at 12.5 s is inside 15 s
    assert result["anomalies_reported"] == 4
    assert result["samples_in"] > 3000  # 4 pumps × 4 tags × 20 Hz × 15 s ≈ 4800
    assert result["bytes_in_raw"] > result["bytes_forwarded"] > 0
    assert result["messages_forwarded"] == result["last_seq"]
    assert result["queue_depth_at_exit"] == 0
    assert (
        result["by_kind"]["event"] >= 7
    )  # each anomaly active then cleared; the last may not clear by 15 s
    store = Path(result["fog_store"])
    assert store == tmp_path / "var" / "fog.db"

    gaps = fogmesh("fog", "tail", f"sqlite:///{store}", "--gaps", "--json")
    assert gaps.returncode == 0, gaps.stderr
    report = json.loads(gaps.stdout)
    assert report["lost"] == 0 and report["complete"] is True
    assert report["gateways"][0]["received"] == result["last_seq"]

    lines = fogmesh("fog", "tail", f"sqlite:///{store}", "--json")
    assert lines.returncode == 0, lines.stderr
    msgs = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [m["seq"] for m in msgs] == list(range(1, result["last_seq"] + 1))
    human = fogmesh("fog", "tail", f"sqlite:///{store}")
    assert "pump1-vibration-high: ACTIVE vibration_mm_s=" in human.stdout


def test_fog_tail_of_a_missing_store_is_one_clear_error(tmp_path: Path) -> None:
    r = fogmesh("fog", "tail", f"sqlite:///{tmp_path}/none.db")
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1] == f"fogmesh: error: no fog store at {tmp_path}/none.db"
    )
