"""A gateway stand-in for the kill -9 tests: submits numbered messages through a real Uplink and
prints each committed seq, so the test knows what was durable when it pulled the trigger.

    python hil_tests/gateway/uplink_producer.py QUEUE URL COUNT RATE [3.1.1|5]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from gateway.config.models import MqttOptions, UplinkSection
from gateway.model import Outgoing
from gateway.uplink import Uplink

_BATCH = 5


async def main(queue: str, url: str, count: int, rate: float, version: str) -> int:
    cfg = UplinkSection(
        retry_initial_ms=50,
        retry_max_ms=200,
        flush_timeout_s=15.0,
        drain_rate_msgs_per_s=5000.0,
        mqtt=MqttOptions(version="5" if version == "5" else "3.1.1"),
    )
    async with Uplink(cfg, site="s1", gateway_id="gw1", queue_path=Path(queue), sink_url=url) as up:
        print(f"ready {up.stats().last_seq}", flush=True)
        sent = 0
        while sent < count:
            n = min(_BATCH, count - sent)
            now_ms = int(time.time() * 1000)
            seqs = up.submit([Outgoing("pump", "raw", now_ms, {"i": sent + k}) for k in range(n)])
            sent += n
            print(f"seq {seqs[-1]}", flush=True)  # committed: it must reach the fog
            await asyncio.sleep(n / rate)
        drained = await up.wait_drained(15.0)
        print(f"{'drained' if drained else 'not drained'} {up.stats().last_seq}", flush=True)
    return 0 if drained else 1


if __name__ == "__main__":
    q, u, c, r = sys.argv[1:5]
    v = sys.argv[5] if len(sys.argv) > 5 else "3.1.1"
    sys.exit(asyncio.run(main(q, u, int(c), float(r), v)))
