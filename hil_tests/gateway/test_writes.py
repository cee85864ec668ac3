"""Safe writes end to end: PUT /api/v1/devices/{id}/tags/{tag} on a running gateway, through the
device service, into a small in-memory PLC, with every refusal's status and audit entry, the
audit log across a restart, and the `audit` messages that reach the fog store.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import pytest
from pydantic import Field

from gateway.audit import AuditLog
from gateway.config import loader as loader_module
from gateway.config.fragments import DeviceBase, TagBase
from gateway.config.loader import LoadedConfig
from gateway.config.models import GatewayConfig
from gateway.errors import DeviceError
from gateway.fog import FogStore
from gateway.model import Value
from gateway.runtime import Gateway
from gateway.writes import Authenticator, WriteRefused, check_value, value_kind
from hil_tests.gateway.gateway_runner import running
from hil_tests.gateway.http_client import Addr, fetch, fetch_sync
from hil_tests.gateway.test_api import conforms
from retrofit_adapters.base import Adapter, Reading
from retrofit_adapters.registry import adapter_class
from retrofit_adapters.simulated.config import SimulatedDevice, SimulatedTag

T = TypeVar("T")
TOKEN = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef-bob"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
WRITE_PATH = "/api/v1/devices/{id}/tags/{tag}"

# --- an in-memory PLC with writable tags, behind an honest adapter ------------------------------


class MemoryTag(TagBase):
    writable: bool = False
    min: float | None = None
    max: float | None = None
    data_type: Literal["bool", "float", "int16", "string"] | None = None


class MemoryDevice(DeviceBase):
    type: Literal["memory"]
    read_only: bool = False  # the adapter declares no "write" capability
    tags: list[MemoryTag] = []


MemoryOrSimulated = Annotated[
    Union[SimulatedDevice, MemoryDevice],  # noqa: UP007
    Field(discriminator="type"),
]


class MemoryConfig(GatewayConfig):
    devices: list[MemoryOrSimulated] = []  # type: ignore[assignment]


class Plc:
    """The device itself: its memory, and switches a test flips to make it misbehave."""

    def __init__(self, values: dict[str, Value]) -> None:
        self.values = dict(values)
        self.down = False  # open() and read() fail
        self.write_error: str | None = None  # write() raises DeviceError with this
        self.write_hangs = False
        self.io_s = 0.0  # how long one read or write takes
        self.active = 0
        self.most_active = 0
        self.writes: list[tuple[str, Value]] = []
        self.reads = 0

    async def _io(self) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(self.io_s)
        finally:
            self.active -= 1


class MemoryAdapter(Adapter):
    type_name = "memory"
    config_model = MemoryDevice
    capabilities: ClassVar[frozenset[str]] = frozenset({"read", "write"})

    def __init__(self, cfg: DeviceBase, plc: Plc) -> None:
        super().__init__(cfg)
        self.plc = plc
        self.connected = False

    async def open(self) -> None:
        if self.plc.down:
            raise DeviceError(f"{self.cfg.id}: connection refused")
        self.connected = True

    async def read(self) -> list[Reading]:
        if not self.connected or self.plc.down:
            self.connected = False
            raise DeviceError(f"{self.cfg.id}: not connected")
        await self.plc._io()
        self.plc.reads += 1
        return [Reading(t, v) for t, v in self.plc.values.items()]

    async def write(self, tag: str, value: Value) -> None:
        if not self.connected:
            raise DeviceError(f"{self.cfg.id}: not connected")
        await self.plc._io()
        if self.plc.write_hangs:
            await asyncio.Event().wait()
        if self.plc.write_error is not None:
            raise DeviceError(f"{self.cfg.id}: {self.plc.write_error}")
        self.plc.values[tag] = value
        self.plc.writes.append((tag, value))

    async def close(self) -> None:
        self.connected = False


class ReadOnlyMemoryAdapter(MemoryAdapter):
    capabilities: ClassVar[frozenset[str]] = frozenset({"read"})


def factory(plcs: dict[str, Plc]) -> Callable[[DeviceBase], Adapter]:
    def make(cfg: DeviceBase) -> Adapter:
        if isinstance(cfg, MemoryDevice):
            cls = ReadOnlyMemoryAdapter if cfg.read_only else MemoryAdapter
            return cls(cfg, plcs[cfg.id])
        return adapter_class(getattr(cfg, "type"))(cfg)  # noqa: B009

    return make


HEAD = """
[gateway]
id = "gw1"
site = "test"

[http]
port = 0
{http}

[uplink]
url = "sqlite:///var/fog.db"

[edge]
window_s = 1
grace_s = 0.1
"""

PLC = """
[[devices]]
id = "plc"
type = "memory"
period_ms = 50
timeout_ms = 300
{extra}

[[devices.tags]]
name = "speed"
writable = true
min = 0
max = 1500
data_type = "float"

[[devices.tags]]
name = "running"
writable = true
data_type = "bool"

[[devices.tags]]
name = "recipe"
writable = true
data_type = "string"

[[devices.tags]]
name = "temp"

[[devices.tags]]
name = "setpoint"
writable = true
max = 80
"""

TOKENS = """
token = { env = "FOGMESH_OPERATOR_TOKEN" }
[[http.tokens]]
name = "alice"
token = { file = "secrets/alice" }
[[http.tokens]]
name = "bob"
token = { env = "BOB_TOKEN" }
"""

START_VALUES: dict[str, Value] = {
    "speed": 100.0,
    "running": False,
    "recipe": "A",
    "temp": 21.5,
    "setpoint": 50,
}


def load(
    tmp_path: Path, *, http: str = TOKENS, devices: str = PLC.format(extra="")
) -> LoadedConfig:
    secrets = tmp_path / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "alice").write_text(TOKEN + "\n")
    env = {"FOGMESH_OPERATOR_TOKEN": OPERATOR_TOKEN, "BOB_TOKEN": BOB}
    return loader_module._parse(
        HEAD.format(http=http) + devices,
        source="<test>",
        base_dir=tmp_path,
        path=None,
        env=env,
        model=MemoryConfig,
    )


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(main())


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def polled(gw: Gateway, dev: str = "plc", n: int = 1) -> None:
    start = gw.services[dev].status.polls_total
    await until(lambda: gw.services[dev].status.polls_total >= start + n)


async def put(
    addr: Addr,
    dev: str,
    tag: str,
    body: object,
    token: str | None = TOKEN,
    content_type: str = "application/json",
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, h, data = await fetch(addr, "PUT", f"/api/v1/devices/{dev}/tags/{tag}", raw, headers)
    return status, h, json.loads(data)


async def audit(addr: Addr, token: str = TOKEN, limit: int = 100) -> list[dict[str, Any]]:
    status, _, data = await fetch(
        addr, "GET", f"/api/v1/audit?limit={limit}", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200, data
    entries: list[dict[str, Any]] = json.loads(data)
    return entries


# --- the whole path -------------------------------------------------------------------------


def test_a_write_goes_through_the_device_and_is_audited_and_sent_upstream(tmp_path: Path) -> None:
    plc = Plc(START_VALUES)
    gw = Gateway(load(tmp_path), adapter_factory=factory({"plc": plc}))

    async def scenario() -> dict[str, Any]:
        async with running(gw) as addr:
            await polled(gw)
            status, _, body = await put(addr, "plc", "speed", {"value": 1200})
            assert status == 200, body
            assert plc.writes == [("speed", 1200)]
            # The old value is the last one polled; the new one shows up with the next poll.
            assert body == {
                "device": "plc",
                "tag": "speed",
                "old_value": 100.0,
                "new_value": 1200,
                "result": "ok",
                "audit_id": body["audit_id"],
            }
            await polled(gw)
            _, _, detail = await fetch(addr, "GET", "/api/v1/devices/plc")
            assert json.loads(detail)["last_values"]["speed"]["value"] == 1200
            status, _, b2 = await put(addr, "plc", "running", {"value": True}, token=BOB)
            assert (status, b2["old_value"], b2["new_value"]) == (200, False, True)
            status, _, b3 = await put(addr, "plc", "recipe", {"value": "B"}, OPERATOR_TOKEN)
            assert status == 200 and b3["old_value"] == "A"
            entries = await audit(addr)
            _, _, page = await fetch(addr, "GET", "/metrics")
            return {"first": body, "entries": entries, "metrics": page.decode()}

    out = run(scenario())
    entries = out["entries"]
    conforms(out["first"], WRITE_PATH, 200, "put")
    conforms(entries, "/api/v1/audit", 200)
    # Newest first: each write is a pending entry (before the device) and its outcome.
    assert [(e["who"], e["tag"], e["result"]) for e in entries] == [
        ("operator", "recipe", "ok"),
        ("operator", "recipe", "pending"),
        ("bob", "running", "ok"),
        ("bob", "running", "pending"),
        ("alice", "speed", "ok"),
        ("alice", "speed", "pending"),
    ]
    ok = entries[4]
    assert ok["id"] == out["first"]["audit_id"] and ok["ref"] == entries[5]["id"]
    assert (ok["old_value"], ok["new_value"], ok["error"]) == (100.0, 1200, None)
    assert ok["remote_addr"] == "127.0.0.1" and ok["device"] == "plc"
    assert 'fogmesh_writes_total{device="plc",result="ok"} 3' in out["metrics"]

    with FogStore(tmp_path / "var" / "fog.db").open(create=False) as fog:
        rows = [r for r in fog.rows(limit=10_000) if r["kind"] == "audit"]
    assert [(r["device"], r["data"]["who"], r["data"]["result"]) for r in rows] == [
        ("plc", "alice", "ok"),
        ("plc", "bob", "ok"),
        ("plc", "operator", "ok"),
    ]
    assert rows[0]["data"]["new_value"] == 1200 and rows[0]["data"]["old_value"] == 100.0
    assert rows[0]["data"]["id"] == out["first"]["audit_id"]


def test_every_refusal_has_its_status_and_its_audit_entry(tmp_path: Path) -> None:
    plc = Plc(START_VALUES)
    devices = PLC.format(extra="") + PLC.format(extra="read_only = true").replace(
        'id = "plc"', 'id = "ro"'
    )
    gw = Gateway(load(tmp_path, devices=devices), adapter_factory=factory({"plc": plc, "ro": plc}))

    async def scenario() -> tuple[list[tuple[int, str]], list[dict[str, Any]], str]:
        seen: list[tuple[int, str]] = []
        async with running(gw) as addr:
            await polled(gw)
            await polled(gw, "ro")

            async def attempt(*args: Any, **kw: Any) -> dict[str, str]:
                status, headers, body = await put(addr, *args, **kw)
                assert body["status"] == status
                conforms(body, WRITE_PATH, status, "put")
                seen.append((status, body["error"]))
                return headers

            h = await attempt("plc", "speed", {"value": 1}, token=None)
            assert h["www-authenticate"] == 'Bearer realm="fogmesh"'
            h = await attempt("plc", "speed", {"value": 1}, token="wrong-token-0123456789")
            assert h["www-authenticate"] == 'Bearer realm="fogmesh", error="invalid_token"'
            await attempt("nope", "speed", {"value": 1}, token=None)  # 401 before 404
            await attempt("nope", "speed", {"value": 1})
            await attempt("plc", "nope", {"value": 1})
            await attempt("plc", "temp", {"value": 1})
            await attempt("plc", "speed", {"value": "fast"})
            await attempt("plc", "speed", {"value": True})
            await attempt("plc", "running", {"value": 1})
            await attempt("plc", "recipe", {"value": 5})
            await attempt("plc", "speed", {"value": None})
            await attempt("plc", "speed", {"value": [1]})
            await attempt("plc", "speed", {"speed": 1})
            await attempt("plc", "speed", {"value": 1, "extra": 2})
            await attempt("plc", "speed", b"{not json")
            await attempt("plc", "speed", b"NaN", content_type="application/json")
            await attempt("plc", "speed", {"value": 1}, content_type="text/plain")
            await attempt("plc", "speed", {"value": 1501})
            await attempt("plc", "speed", {"value": -0.5})
            await attempt("plc", "setpoint", {"value": 80.5})  # type from the last value read
            await attempt("ro", "speed", {"value": 5})  # the adapter takes no writes
            plc.write_error = "exception 3: illegal data value"
            await attempt("plc", "speed", {"value": 5})
            plc.write_error = None
            plc.write_hangs = True
            await attempt("plc", "speed", {"value": 6})
            plc.write_hangs = False
            entries = await audit(addr)
            _, _, page = await fetch(addr, "GET", "/metrics")
        return seen, entries, page.decode()

    seen, entries, page = run(scenario())
    assert seen == [
        (401, "bearer token required (Authorization: Bearer <token>)"),
        (401, "invalid bearer token"),
        (401, "bearer token required (Authorization: Bearer <token>)"),
        (404, "no device 'nope'"),
        (404, "device 'plc' has no tag 'nope'"),
        (403, "tag 'temp' of device 'plc' is not writable"),
        (400, "tag 'speed' takes a number, got a string"),
        (400, "tag 'speed' takes a number, got a boolean"),
        (400, "tag 'running' takes a boolean, got a number"),
        (400, "tag 'recipe' takes a string, got a number"),
        (400, "tag 'speed' takes a boolean, a number or a string, got null"),
        (400, "tag 'speed' takes a boolean, a number or a string, got an array"),
        (400, 'the body must be a JSON object {"value": ...}'),
        (400, 'the body must be a JSON object {"value": ...}'),
        (400, seen[14][1]),
        (400, 'the body must be a JSON object {"value": ...}'),
        (415, "expected Content-Type: application/json"),
        (422, "tag 'speed': 1501 is out of range 0..1500 (min..max)"),
        (422, "tag 'speed': -0.5 is out of range 0..1500 (min..max)"),
        (422, "tag 'setpoint': 80.5 is out of range ..80 (min..max)"),
        (403, "device type 'memory' does not support writes"),
        (502, "plc: exception 3: illegal data value"),
        (502, "timeout: write took more than 300 ms"),
    ]
    assert seen[14][1].startswith("invalid JSON body")
    assert plc.writes == []  # nothing refused ever reached the device

    outcomes = [e for e in reversed(entries) if e["result"] != "pending"]
    assert [(e["who"], e["device"], e["tag"], e["result"]) for e in outcomes] == [
        ("anonymous", "plc", "speed", "refused"),
        ("anonymous", "plc", "speed", "refused"),
        ("anonymous", "nope", "speed", "refused"),
        ("alice", "nope", "speed", "not_found"),
        ("alice", "plc", "nope", "not_found"),
        ("alice", "plc", "temp", "forbidden"),
        *[("alice", "plc", t, "invalid") for t in ["speed"] * 2 + ["running", "recipe"]],
        *[("alice", "plc", "speed", "invalid")] * 7,
        ("alice", "plc", "speed", "out_of_range"),
        ("alice", "plc", "speed", "out_of_range"),
        ("alice", "plc", "setpoint", "out_of_range"),
        ("alice", "ro", "speed", "forbidden"),
        ("alice", "plc", "speed", "failed"),
        ("alice", "plc", "speed", "failed"),
    ]
    assert [e["error"] for e in outcomes] == [m for _, m in seen]
    assert outcomes[0]["new_value"] is None  # nothing an anonymous client sent is kept
    assert outcomes[17]["new_value"] == 1501 and outcomes[17]["old_value"] == 100.0
    # Only the writes that reached the device service have a pending entry before them.
    pending = [e for e in entries if e["result"] == "pending"]
    assert len(pending) == 3 and all(e["new_value"] in (5, 6) for e in pending)
    assert {e["ref"] for e in outcomes[-3:]} == {e["id"] for e in pending}
    for line in (
        'fogmesh_writes_total{device="plc",result="refused"} 2',
        'fogmesh_writes_total{device="_gateway",result="refused"} 1',
        'fogmesh_writes_total{device="_gateway",result="not_found"} 1',
        'fogmesh_writes_total{device="plc",result="invalid"} 11',
        'fogmesh_writes_total{device="plc",result="failed"} 2',
        'fogmesh_writes_total{device="ro",result="forbidden"} 1',
    ):
        assert line in page, line


def test_a_device_that_is_down_or_not_connected_answers_503(tmp_path: Path) -> None:
    down = Plc(START_VALUES)
    down.down = True
    waiting = Plc(START_VALUES)
    waiting.down = True
    devices = PLC.format(
        extra="supervisor = { breaker_failures = 1, breaker_cooldown_s = 60 }"
    ) + PLC.format(
        extra="supervisor = { backoff_initial_ms = 5000, breaker_failures = 9 }"
    ).replace('id = "plc"', 'id = "slow"')
    gw = Gateway(
        load(tmp_path, devices=devices), adapter_factory=factory({"plc": down, "slow": waiting})
    )

    async def scenario() -> list[tuple[int, str]]:
        async with running(gw) as addr:
            await until(
                lambda: (
                    gw.services["plc"].breaker_open and gw.services["slow"].status.errors_total >= 1
                )
            )
            out = []
            for dev in ("plc", "slow"):
                t0 = time.monotonic()
                status, _, body = await put(addr, dev, "speed", {"value": 1})
                out.append((status, body["error"]))
                if dev == "slow":  # waited for the connection up to timeout_ms, not longer
                    assert 0.25 < time.monotonic() - t0 < 2.0
            entries = await audit(addr)
        assert [e["result"] for e in entries[:2]] == ["unavailable", "pending"]
        return out

    assert run(scenario()) == [
        (503, "device 'plc' is down (circuit breaker open): plc: connection refused"),
        (503, "device 'slow' is not connected (slow: connection refused)"),
    ]


def test_writes_take_turns_with_polls(tmp_path: Path) -> None:
    plc = Plc(START_VALUES)
    plc.io_s = 0.02  # every read and write takes 20 ms on the wire
    devices = PLC.format(extra="").replace("period_ms = 50", "period_ms = 10")
    gw = Gateway(load(tmp_path, devices=devices), adapter_factory=factory({"plc": plc}))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
        path = "/api/v1/devices/plc/tags/speed"
        # Own threads for the clients: the gateway's audit commits need the default executor.
        with ThreadPoolExecutor(8) as pool:
            async with running(gw) as addr:
                await polled(gw)
                results = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            pool, fetch_sync, addr, "PUT", path, b'{"value": %d}' % v, headers
                        )
                        for v in range(8)
                    )
                )
                await polled(gw, n=3)
        assert [r[0] for r in results] == [200] * 8
        assert sorted(v for _, v in plc.writes) == list(range(8))
        assert plc.most_active == 1  # never a write and a read (or two writes) at once
        # Polling went on around the writes (a poll before, three after). Whether one also fell
        # between two writes depends on scheduling: under load it may not (CI saw 4).
        assert plc.reads >= 4

    run(scenario())


def test_no_token_configured_means_no_writes_and_no_reload(tmp_path: Path) -> None:
    plc = Plc(START_VALUES)
    gw = Gateway(load(tmp_path, http=""), adapter_factory=factory({"plc": plc}))
    disabled = "writes are disabled: no [http] token configured"

    async def scenario() -> None:
        async with running(gw) as addr:
            await polled(gw)
            status, _, body = await put(addr, "plc", "speed", {"value": 1})
            assert (status, body["error"]) == (403, disabled)
            for method, path in (("GET", "/api/v1/audit"), ("POST", "/api/v1/reload")):
                status, _, raw = await fetch(
                    addr, method, path, headers={"Authorization": f"Bearer {TOKEN}"}
                )
                assert (status, json.loads(raw)["error"]) == (403, disabled)
        assert plc.writes == []

    run(scenario())
    with AuditLog(tmp_path / "var" / "audit.db") as log:
        (entry,) = log.recent()
    assert (entry.who, entry.result, entry.error) == ("anonymous", "disabled", disabled)


def test_the_audit_log_survives_a_restart_and_completes_a_write_cut_short(tmp_path: Path) -> None:
    plc = Plc(START_VALUES)

    async def first() -> int:
        gw = Gateway(load(tmp_path), adapter_factory=factory({"plc": plc}))
        async with running(gw) as addr:
            await polled(gw)
            status, _, body = await put(addr, "plc", "speed", {"value": 7})
            assert status == 200
            return int(body["audit_id"])

    ok_id = run(first())
    # A gateway killed between the device write and its outcome leaves a pending entry.
    with AuditLog(tmp_path / "var" / "audit.db") as log:
        cut = log.record(
            who="bob", remote_addr="10.0.0.9", device="plc", tag="speed", result="pending",
            old_value=7, new_value=9,
        )  # fmt: skip

    async def second() -> list[dict[str, Any]]:
        gw = Gateway(load(tmp_path), adapter_factory=factory({"plc": plc}))
        async with running(gw) as addr:
            await polled(gw)
            status, _, body = await put(addr, "plc", "speed", {"value": 8})
            assert status == 200 and body["audit_id"] > cut.id
            newest = await audit(addr, limit=1)
            assert [e["id"] for e in newest] == [body["audit_id"]]
            for bad in ("0", "1001", "x", "-1"):
                status, _, raw = await fetch(
                    addr,
                    "GET",
                    f"/api/v1/audit?limit={bad}",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert (status, json.loads(raw)["error"]) == (
                    400,
                    "limit must be an integer 1..1000",
                )
            status, _, _ = await fetch(addr, "GET", "/api/v1/audit")
            assert status == 401
            return await audit(addr)

    entries = run(second())
    by_id = {e["id"]: e for e in entries}
    assert by_id[ok_id]["result"] == "ok" and by_id[ok_id]["new_value"] == 7
    unknown = [e for e in entries if e["result"] == "unknown"]
    assert len(unknown) == 1 and unknown[0]["ref"] == cut.id and unknown[0]["who"] == "bob"
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    with FogStore(tmp_path / "var" / "fog.db").open(create=False) as fog:
        results = [r["data"]["result"] for r in fog.rows(limit=10_000) if r["kind"] == "audit"]
    assert results == ["ok", "unknown", "ok"]  # the fog learns how the cut-short write ended


def test_tokens_are_compared_in_constant_time_and_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = Authenticator([("alice", TOKEN), ("bob", BOB), ("carol", "x" * 300)])
    assert auth.identify(BOB) == "bob"
    # Every token is compared, as digests of one length, whichever matches.
    assert calls == [(32, 32)] * 3
    assert auth.identify("y" * 300) is None and auth.identify(None) is None
    assert TOKEN not in repr(auth) and BOB not in repr(auth)
    with pytest.raises(WriteRefused) as refused:
        auth.require(TOKEN[:-1])
    assert refused.value.status == 401 and TOKEN[:-1] not in str(refused.value)

    plc = Plc(START_VALUES)
    loaded = load(tmp_path)
    assert TOKEN not in repr(loaded) and BOB not in repr(loaded.config)
    gw = Gateway(loaded, adapter_factory=factory({"plc": plc}))

    async def scenario() -> None:
        async with running(gw) as addr:
            await polled(gw)
            assert (await put(addr, "plc", "speed", {"value": 3}))[0] == 200
            assert (await put(addr, "plc", "speed", {"value": 3}, token=TOKEN + "x"))[0] == 401

    calls.clear()
    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert len(calls) == 2 * 3  # two requests, three tokens each
    for secret in (TOKEN, BOB, OPERATOR_TOKEN):
        assert secret not in caplog.text
        for db in ("audit.db", "fog.db", "queue.db"):
            path = tmp_path / "var" / db
            if path.exists():
                assert secret.encode() not in path.read_bytes()


# --- value checks on their own ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "last", "kind"),
    [
        (MemoryTag(name="a", data_type="bool"), None, "bool"),
        (MemoryTag(name="a", data_type="int16"), None, "number"),
        (MemoryTag(name="a", data_type="string"), 5, "string"),  # declared wins over the last
        (MemoryTag(name="a"), 1.5, "number"),
        (MemoryTag(name="a"), True, "bool"),
        (MemoryTag(name="a"), "x", "string"),
        (MemoryTag(name="a"), None, None),
        (SimulatedTag(name="flow_m3h"), 40.1, "number"),
    ],
)
def test_value_kind(tag: Any, last: Value | None, kind: str | None) -> None:
    assert value_kind(tag, last) == kind


class _Coil:
    name = "c"
    table = "coil"
    bit = None


class _Bit:
    name = "b"
    table = "holding"
    bit = 3
    type = "uint16"


class _Register:
    name = "r"
    table = "holding"
    bit = None
    type = "float32"


class _Text:
    name = "t"
    table = "holding"
    bit = None
    type = "string(8)"


def test_value_kind_of_modbus_like_tags() -> None:
    assert [value_kind(t) for t in (_Coil(), _Bit(), _Register(), _Text())] == [
        "bool",
        "bool",
        "number",
        "string",
    ]


def test_check_value_without_a_known_type_takes_any_scalar() -> None:
    tag = MemoryTag(name="x", writable=True, min=-1, max=1)
    assert check_value(tag, "text") == "text"
    assert check_value(tag, True) is True  # booleans are not held to a numeric range
    assert check_value(tag, 1) == 1
    with pytest.raises(WriteRefused, match=r"out of range -1\.\.1"):
        check_value(tag, 2)
    with pytest.raises(WriteRefused, match="not a finite number"):
        check_value(tag, float("inf"))


def test_the_audit_file_is_in_the_data_dir(tmp_path: Path) -> None:
    loaded = load(tmp_path)
    gw = Gateway(loaded, adapter_factory=factory({"plc": Plc(START_VALUES)}))
    assert gw.audit.path == tmp_path / "var" / "audit.db"

    async def scenario() -> None:
        async with running(gw):
            pass

    run(scenario())
    db = sqlite3.connect(tmp_path / "var" / "audit.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
