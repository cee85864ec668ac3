"""`fogmesh bench gateway` runs end to end and its figures add up (correctness, not speed)."""

from __future__ import annotations

import pytest

from tools.bench_gateway import run_gateway_bench


@pytest.mark.slow
def test_small_gateway_bench_delivers_every_tag() -> None:
    r = run_gateway_bench(devices=3, tags=7, period_ms=200, seconds=2.0, warmup_s=1.5)
    assert r["errors"] == 0
    assert r["expected_tags_per_s"] == pytest.approx(3 * 7 * 5)
    assert 0.9 <= r["tags_per_s_ratio"] <= 1.1
    assert r["requests_per_s"] == pytest.approx(3 * 5, rel=0.1)  # 7 contiguous tags: one request
    assert r["device_health"]["ok"] == 3
    for key in (
        "gateway_cpu_percent",
        "gateway_rss_mb",
        "poll_latency_p50_ms",
        "poll_latency_p99_ms",
    ):
        assert r[key] is not None and r[key] > 0
    assert r["server_cpu_percent"] is not None
