"""`fogmesh fog tail`: print what reached a fog, decoded, or report gaps in its seqs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from gateway.config.models import MqttOptions
from gateway.fog import gap_report_url, tail

PASSWORD_ENV = "FOGMESH_MQTT_PASSWORD"


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def describe(msg: dict[str, Any], t0: float | None = None) -> str:
    """One line for one fog message; times relative to t0 when given, else wall clock."""
    if "error" in msg:
        return f"undecodable message on {msg.get('topic')}: {msg['error']}"
    ts = msg["ts_ms"] / 1000.0
    when = (
        f"{ts - t0:+7.2f}s"
        if t0 is not None
        else time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    )
    hist = " hist" if msg.get("historical") else ""
    head = f"{when}  seq {msg['seq']:>5}{hist}  {msg['device']:<9} {msg['kind']:<8}"
    data = msg.get("data", {})
    kind = msg["kind"]
    if kind == "event":
        return (
            f"{head} {data.get('rule')}: {str(data.get('state', '')).upper()} "
            f"{data.get('tag')}={_num(data.get('value'))} ({data.get('direction')} {data.get('limit')}, {data.get('severity')})"
        )
    if kind == "summary":
        parts = [
            f"{name} n={st.get('count')} mean={_num(st.get('mean'))} max={_num(st.get('max'))}"
            for name, st in sorted(data.get("tags", {}).items())
        ]
        flag = " partial" if data.get("partial") else ""
        return f"{head} {data.get('window_s')}s window{flag}: " + "; ".join(parts)
    if kind == "raw":
        return f"{head} {data.get('tag')}={_num(data.get('value'))} {data.get('unit', '')}".rstrip()
    if kind == "status":
        err = f" ({data.get('error')})" if data.get("error") else ""
        return f"{head} health {data.get('previous')} -> {data.get('health')}{err}"
    return f"{head} {json.dumps(data, default=str)[:160]}"


def _gap_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for g in report["gateways"]:
        lines.append(
            f"{g['site']}/{g['gateway']}: seq {g['first_seq']}..{g['last_seq']}, received {g['received']}, "
            f"duplicates {g['duplicates']}, dropped on purpose {g['declared_missing_count']}, lost {g['lost_count']}"
        )
        for a, b in g["lost"]:
            lines.append(f"  lost seq {a}" + (f"..{b}" if b != a else ""))
        for a, b, reason in g["declared"]:
            lines.append(f"  declared dropped seq {a}..{b} ({reason})")
    if not report["gateways"]:
        lines.append("no messages")
    return lines


def fog_tail(args: argparse.Namespace) -> int:
    opts = MqttOptions(username=args.username) if args.username else None
    password = os.environ.get(PASSWORD_ENV)
    if args.gaps:
        report = asyncio.run(gap_report_url(args.url, options=opts, password=password))
        if args.json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            print("\n".join(_gap_lines(report)))
        return 1 if report["lost"] else 0

    def show(msg: dict[str, Any]) -> None:
        if args.json:
            sys.stdout.write(json.dumps(msg, default=str) + "\n")
        else:
            sys.stdout.write(describe(msg) + "\n")
        sys.stdout.flush()

    async def run() -> int:
        stop = asyncio.Event()
        if args.seconds is not None:
            asyncio.get_running_loop().call_later(args.seconds, stop.set)
        return await tail(
            args.url,
            on_message=show,
            follow=args.follow,
            stop=stop,
            options=opts,
            password=password,
        )

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `fogmesh fog tail ... | head`: the reader left; that is not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    return 0
