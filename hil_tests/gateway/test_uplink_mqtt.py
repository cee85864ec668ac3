"""Store-and-forward against a real Mosquitto on loopback: broker restarts, kill -9, auth, ACL
refusals (MQTT 5), TLS, a full disk — and every seq reaches the fog.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from gateway.config.models import MqttOptions, QueueConfig, TlsConfig, UplinkSection
from gateway.fog import FogStore, tail
from gateway.model import Outgoing
from gateway.queue import DurableQueue
from gateway.uplink import Uplink
from tools.mosquitto import Mosquitto, MosquittoTls

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]
PRODUCER = Path(__file__).with_name("uplink_producer.py")


def out(i: int) -> Outgoing:
    return Outgoing("pump", "raw", int(time.time() * 1000), {"i": i})


def config(version: str = "3.1.1", **mqtt: Any) -> UplinkSection:
    return UplinkSection(
        retry_initial_ms=50,
        retry_max_ms=300,
        flush_timeout_s=5.0,
        drain_rate_msgs_per_s=20_000.0,
        mqtt=MqttOptions(version=version, **mqtt),  # type: ignore[arg-type]
    )


def make_uplink(
    tmp_path: Path, url: str, cfg: UplinkSection, password: str | None = None
) -> Uplink:
    return Uplink(
        cfg,
        site="s1",
        gateway_id="gw1",
        queue_path=tmp_path / "var" / "queue.db",
        sink_url=url,
        password=password,
    )


async def until(pred: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class Fog:
    """The fog under test: a persistent QoS 1 subscriber storing into a FogStore, on this loop."""

    def __init__(self, url: str, path: Path, *, version: str = "3.1.1", **kw: Any) -> None:
        self.url = url
        self.store = FogStore(path)
        self.options = MqttOptions(version=version, **kw.pop("mqtt", {}))  # type: ignore[arg-type]
        self.kw = kw
        self.states: list[str] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[int] | None = None

    def _seen(self, msg: dict[str, Any]) -> None:
        if msg.get("kind") == "state":
            self.states.append(msg["state"])

    async def __aenter__(self) -> Fog:
        self.store.open()
        # A first short session creates the subscription before anything is published.
        await tail(
            self.url,
            on_message=self._seen,
            idle_s=0.1,
            options=self.options,
            client_id="fog-under-test",
            store=self.store,
            **self.kw,
        )
        self.task = asyncio.create_task(
            tail(
                self.url,
                on_message=self._seen,
                follow=True,
                stop=self.stop,
                options=self.options,
                client_id="fog-under-test",
                store=self.store,
                retry_max_s=0.2,
                **self.kw,
            )
        )
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)
        self.store.close()

    def seqs(self) -> list[int]:
        return self.store.seqs("s1", "gw1")

    def report(self) -> dict[str, Any]:
        (g,) = self.store.gap_report()["gateways"]
        assert isinstance(g, dict)
        return g


@pytest.mark.parametrize("version", ["3.1.1", "5"])
def test_every_seq_arrives_through_a_broker_restart_mid_stream(
    tmp_path: Path, mosquitto: Mosquitto, version: str
) -> None:
    async def run() -> None:
        async with Fog(mosquitto.url, tmp_path / "fog.db", version=version) as fog:
            async with make_uplink(tmp_path, mosquitto.url, config(version)) as up:
                await until(lambda: up.stats().connected)
                for i in range(300):
                    up.submit([out(4 * i + k) for k in range(4)])
                    if i == 100:
                        await asyncio.to_thread(mosquitto.stop)  # SIGTERM: saves sessions
                    if i == 200:
                        assert up.stats().backlog > 0 and not up.stats().connected
                        await asyncio.to_thread(mosquitto.start)
                    await asyncio.sleep(0.002)
                assert await up.wait_drained(20)
                st = up.stats()
                assert st.reconnects_total >= 1 and st.acked_total >= 1200
            await until(lambda: len(fog.seqs()) >= 1200)
            assert fog.seqs() == list(range(1, 1201))
            rows = fog.store.rows(limit=10_000)
            assert any(r["historical"] for r in rows) and not all(r["historical"] for r in rows)
            report = fog.report()
            assert report["lost_count"] == 0 and report["complete"]
            assert "offline" in fog.states and "online" in fog.states  # retained state topic

    asyncio.run(run())


def test_every_seq_arrives_when_the_gateway_is_killed_mid_stream(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    queue = tmp_path / "var" / "queue.db"

    def start(count: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(PRODUCER), str(queue), mosquitto.url, str(count), "1000"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )

    async def run() -> int:
        async with Fog(mosquitto.url, tmp_path / "fog.db") as fog:
            proc = start(100_000)
            assert proc.stdout is not None
            committed = 0
            while committed < 1500:  # ~1.5 s in: plenty in flight and unacknowledged
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line, "the producer died"
                if line.startswith("seq "):
                    committed = int(line.split()[1])
            proc.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
            proc.stdout.close()
            # The will: published as soon as the broker sees the dead socket.
            await until(lambda: "offline" in fog.states, 5)

            proc = start(500)  # the restarted gateway resends its backlog and goes on
            text, _ = await asyncio.to_thread(proc.communicate, None, 60)
            assert proc.returncode == 0, text
            last = int(text.splitlines()[-1].split()[1])
            assert last >= committed + 500
            await until(lambda: len(fog.seqs()) >= last, 30)
            # Each seq stored once: re-sends after the kill only add to report["duplicates"].
            assert fog.seqs() == list(range(1, last + 1))
            report = fog.report()
            assert report["lost_count"] == 0 and report["complete"]
            return committed

    committed = asyncio.run(run())
    with DurableQueue(queue, QueueConfig(), site="s1", gateway_id="gw1") as q:
        assert q.depth == 0 and q.last_seq >= committed


def test_username_and_password(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    broker = mosquitto_factory(users={"gw1": "s3cret", "fog": "f0g"})

    async def run() -> None:
        fog_kw: dict[str, Any] = {"mqtt": {"username": "fog"}, "password": "f0g"}
        async with Fog(broker.url, tmp_path / "fog.db", **fog_kw) as fog:
            bad = make_uplink(tmp_path / "bad", broker.url, config("5", username="gw1"), "wrong")
            async with bad as up:
                up.submit([out(i) for i in range(3)])
                await until(lambda: up.stats().last_error is not None)
                await asyncio.sleep(0.3)
                st = up.stats()
                assert not st.connected and st.queue_depth == 3
                assert st.last_error is not None and (
                    "Bad user name or password" in st.last_error
                    or "Not authorized" in st.last_error
                )
            good = make_uplink(tmp_path / "bad", broker.url, config("5", username="gw1"), "s3cret")
            async with good as up:
                assert await up.wait_drained(10)  # the queue kept them: nothing lost to a typo
            await until(lambda: fog.seqs() == [1, 2, 3])

    asyncio.run(run())


def test_mqtt5_puback_with_a_failure_code_is_not_an_ack(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    # Anonymous clients may read everything but write only the gateway's state topic.
    broker = mosquitto_factory(
        acl="topic read fogmesh/v1/#\ntopic readwrite fogmesh/v1/s1/gw1/_gateway/state\n"
    )

    async def run() -> None:
        async with Fog(broker.url, tmp_path / "fog.db", version="5") as fog:
            async with make_uplink(tmp_path, broker.url, config("5")) as up:
                up.submit([out(i) for i in range(5)])
                await until(lambda: "Not authorized" in (up.stats().last_error or ""))
                await asyncio.sleep(0.3)
                st = up.stats()
                assert st.acked_total == 0 and st.queue_depth == 5
                assert st.sent_total >= 5
                broker.set_acl("topic readwrite fogmesh/v1/#\n")  # SIGHUP reload
                assert await up.wait_drained(15)
            await until(lambda: fog.seqs() == [1, 2, 3, 4, 5])

    asyncio.run(run())


def test_a_refused_state_topic_stops_state_messages_not_data(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    broker = mosquitto_factory(
        acl="topic read fogmesh/v1/#\ntopic readwrite fogmesh/v1/s1/gw1/pump/#\n"
    )

    async def run() -> None:
        async with Fog(broker.url, tmp_path / "fog.db", version="5") as fog:
            async with make_uplink(tmp_path, broker.url, config("5")) as up:
                up.submit([out(i) for i in range(3)])
                assert await up.wait_drained(15)
                assert getattr(up.sink, "state_enabled", None) is False
            await until(lambda: fog.seqs() == [1, 2, 3])
            assert fog.states == []

    asyncio.run(run())


def test_a_full_disk_refuses_new_messages_and_the_fog_still_gets_every_seq(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async def run() -> None:
        async with Fog(mosquitto.url, tmp_path / "fog.db") as fog:
            await asyncio.to_thread(mosquitto.stop)
            up = make_uplink(tmp_path, mosquitto.url, config())
            up.queue = DurableQueue(  # a tiny disk: the database may not grow past 24 pages
                tmp_path / "var" / "queue.db",
                QueueConfig(),
                site="s1",
                gateway_id="gw1",
                max_db_pages=24,
            )
            async with up:
                refused = 0
                for i in range(5000):
                    if not up.submit([Outgoing("pump", "raw", i, {"pad": "x" * 300})]):
                        refused += 1
                        if refused == 10:
                            break
                st = up.stats()
                assert refused == 10 and st.drops == {"disk_full": 10}
                assert st.last_error is not None and "disk full" in st.last_error
                last = st.last_seq
                await asyncio.to_thread(mosquitto.start)
                assert await up.wait_drained(20)
                # Once acks freed pages, the gap message reports the refusals.
                await until(lambda: up.stats().last_seq == last + 1, 10)
                assert await up.wait_drained(10)
            await until(lambda: len(fog.seqs()) == last + 1)
            assert fog.seqs() == list(range(1, last + 2))
            report = fog.report()
            assert report["rejected"] == {"disk_full": 10}
            assert report["complete"]

    asyncio.run(run())


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: Path) -> MosquittoTls:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    d.mkdir()
    ca_key, ca, key, csr, crt = (
        d / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt")
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # fast keygen
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=fogmesh test CA",
             "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    _openssl("req", "-new", *ec, "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return MosquittoTls(ca_file=ca, cert_file=crt, key_file=key)


def test_tls_with_a_private_ca(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it makes the test certificates")
    tls = make_certs(tmp_path / "pki")
    broker = mosquitto_factory(tls=tls)
    assert broker.url.startswith("mqtts://")
    trusted: dict[str, Any] = {"tls": TlsConfig(ca_file=str(tls.ca_file))}

    async def run() -> None:
        async with Fog(broker.url, tmp_path / "fog.db", mqtt=trusted) as fog:
            # Without our CA the certificate is not trusted: the data waits in the queue.
            async with make_uplink(tmp_path, broker.url, config()) as up:
                up.submit([out(i) for i in range(3)])
                await until(lambda: "certificate verify failed" in (up.stats().last_error or ""))
                assert up.stats().queue_depth == 3
            async with make_uplink(tmp_path, broker.url, config(**trusted)) as up:
                up.submit([out(3)])
                assert await up.wait_drained(10)
            await until(lambda: fog.seqs() == [1, 2, 3, 4])

    asyncio.run(run())
