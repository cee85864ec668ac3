"""The MQTT fog sink (3.1.1 or 5, QoS 1, optional TLS) and a paho client driven by the asyncio loop.

paho runs on the event loop's thread (socket readiness callbacks, no network thread): acks arrive
in batches with no locks or thread hand-offs. Only the blocking TCP/TLS connect runs in a worker.
Every connection uses a fresh paho client with a clean session, so paho never re-sends by itself;
the uplink re-sends from SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import ssl
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import wire
from gateway.config.models import MqttOptions, TlsConfig
from gateway.errors import UplinkError
from gateway.model import GATEWAY_DEVICE
from gateway.sinks.base import OutMessage, Sink, SinkListener

__all__ = ["STATE_KIND", "AsyncPaho", "MqttSink", "mqtt_address", "ssl_context"]

log = logging.getLogger("fogmesh.mqtt")

STATE_KIND = "state"  # fogmesh/v1/<site>/<gateway>/_gateway/state: retained "online" / "offline"
_READ_BURST = 512  # packets read per readiness callback before giving the loop back
_MISC_PERIOD_S = 1.0  # keepalive bookkeeping (PINGREQ, dead-peer detection)


def mqtt_address(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of an mqtt:// or mqtts:// URL; default ports 1883 and 8883."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise UplinkError(f"not an MQTT URL: {parts.scheme}://{parts.hostname}")
    if not parts.hostname:
        raise UplinkError("MQTT URL needs a host: mqtt://host:port")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise UplinkError(f"bad port in MQTT URL: {exc}") from exc
    return parts.hostname, port, tls


def ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client TLS context from the config; file problems become UplinkError."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        if tls is not None and tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise UplinkError(f"TLS setup failed: {exc}") from exc
    if tls is not None and tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def new_client(
    options: MqttOptions,
    *,
    client_id: str,
    username: str | None,
    password: str | None,
    tls: bool,
    clean: bool,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A paho client as fogmesh uses it: our own reconnects, credentials and TLS from the config."""
    v5 = options.version == "5"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
        reconnect_on_failure=False,
        manual_ack=manual_ack,
    )
    if username is not None or password is not None:
        client.username_pw_set(username, password)
    if tls:
        client.tls_set_context(ssl_context(options.tls))
        if options.tls is not None and options.tls.insecure:
            client.tls_insecure_set(True)
    return client


def _has_data(sock: Any) -> bool:
    # TLS may hold decrypted bytes the kernel no longer reports as readable.
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


# What CONNACK said: flags, reason code and (MQTT 5) properties.
_Connack = tuple[mqtt.ConnectFlags, ReasonCode, Properties | None]


class AsyncPaho:
    """Drives one paho Client from the running asyncio loop; used by the sink and the fog tail.

    The owner sets its own message/publish callbacks on `client`; `after_read` runs once per burst
    of received packets (to hand over batched acks), `on_lost` once when an established
    connection drops.
    """

    def __init__(
        self,
        client: mqtt.Client,
        *,
        on_lost: Callable[[str], None],
        after_read: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self._on_lost = on_lost
        self._after_read = after_read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None
        self._misc: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[_Connack] | None = None
        self._closed: asyncio.Future[None] | None = None
        self.connected = False
        self._closing = False
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect

    async def connect(
        self, host: str, port: int, keepalive: int, *, timeout_s: float, **kwargs: Any
    ) -> _Connack:
        """TCP/TLS connect in a worker thread, then wait for CONNACK on the loop."""
        loop = self._loop = asyncio.get_running_loop()
        connack: asyncio.Future[_Connack] = loop.create_future()
        self._connack = connack
        self.client.connect_timeout = timeout_s
        job = loop.run_in_executor(
            None, functools.partial(self.client.connect, host, port, keepalive, **kwargs)
        )
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # The thread can't be interrupted; close its socket once it is done.
            job.add_done_callback(lambda _f: self._close_socket())
            raise
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS handshake, cert name
            raise UplinkError(f"cannot connect to {host}:{port}: {exc}") from exc
        self._attach()
        try:
            async with asyncio.timeout(timeout_s):
                result = await connack
        except TimeoutError:
            self.abort()
            raise UplinkError(f"no CONNACK from {host}:{port} within {timeout_s} s") from None
        except BaseException:
            self.abort()
            raise
        if result[1].is_failure:
            self.abort()
            raise UplinkError(f"broker {host}:{port} refused the connection: {result[1]}")
        self.connected = True
        return result

    def _attach(self) -> None:
        loop = self._loop
        assert loop is not None
        client = self.client
        sock = self._sock = client.socket()
        if sock is None:
            raise UplinkError("connection closed during connect")
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        loop.add_reader(sock, self._on_readable)
        if client.want_write():
            # paho believes a writer is registered already (the connect thread tried to).
            loop.add_writer(sock, self._on_writable)
        self._misc = loop.call_later(_MISC_PERIOD_S, self._on_misc)
        loop.call_soon(self._on_readable)  # CONNACK may already be waiting

    # ---- paho callbacks (all on the loop thread) -----------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((flags, reason, properties))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._detach()
        text = (
            f"broker closed the connection: {reason}"
            if flags.is_disconnect_packet_from_server
            else f"connection lost ({reason})"
        )
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(UplinkError(text))
            return
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self.connected and not self._closing:
            self.connected = False
            self._on_lost(text)
        self.connected = False

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._detach()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._sock is not None:
            self._loop.add_writer(sock, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._sock is not None:
            self._loop.remove_writer(sock)

    # ---- readiness -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        client = self.client
        try:
            for _ in range(_READ_BURST):
                if self._sock is None:
                    break
                rc = client.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not _has_data(self._sock):
                    break
            if self._after_read is not None:
                self._after_read()
        except Exception as exc:
            self._fail(exc)

    def _on_writable(self) -> None:
        try:
            if self._sock is not None:
                self.client.loop_write()
        except Exception as exc:
            self._fail(exc)

    def _on_misc(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        try:
            self.client.loop_misc()
        except Exception as exc:
            self._fail(exc)
            return
        if self._sock is not None and self._loop is not None:
            self._misc = self._loop.call_later(_MISC_PERIOD_S, self._on_misc)

    def _fail(self, exc: Exception) -> None:
        # A bug in a callback must not leave a half-dead connection behind: drop it, and the
        # owner reconnects (the uplink re-sends from SQLite).
        log.exception("MQTT connection dropped after an internal error")
        was_connected = self.connected and not self._closing
        self.abort()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(UplinkError(f"internal error: {exc!r}"))
        elif was_connected:
            self._on_lost(f"internal error: {exc!r}")

    def _detach(self) -> None:
        sock, self._sock = self._sock, None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if sock is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)

    def _close_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # ---- shutdown --------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT (the broker will publish the will)."""
        self._closing = True
        self.connected = False
        self._detach()
        self._close_socket()

    async def disconnect(self, timeout_s: float = 2.0) -> None:
        """Send DISCONNECT (no will) and wait for it to leave; abort after timeout_s."""
        if self._sock is None or self._loop is None:
            self.abort()
            return
        self._closing = True
        self._closed = self._loop.create_future()
        self.client.disconnect()
        try:
            async with asyncio.timeout(timeout_s):
                await self._closed
        except TimeoutError:
            pass
        finally:
            self.abort()


class MqttSink(Sink):
    """Publishes envelopes at QoS 1; a PUBACK with a success reason code is the acknowledgement."""

    def __init__(
        self,
        url: str,
        listener: SinkListener,
        *,
        options: MqttOptions,
        site: str,
        gateway_id: str,
        password: str | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(url, listener)
        self.host, self.port, tls_implied = mqtt_address(url)
        self.options = options
        self.tls = options.tls is not None or tls_implied
        self.username = options.username or urlsplit(url).username
        self.password = password
        self.client_id = options.client_id or f"fogmesh-{site}-{gateway_id}"
        self.state_topic = wire.topic_for(site, gateway_id, GATEWAY_DEVICE, STATE_KIND)
        self.connect_timeout_s = connect_timeout_s
        self._paho: AsyncPaho | None = None
        self._window: int = int(options.inflight)
        self._mids: dict[int, int] = {}  # paho message id -> seq, for this connection only
        self._acked: list[int] = []
        self._refused: list[int] = []
        self._refused_reason = ""
        self.server_receive_maximum: int | None = None
        # Mosquitto drops a client after any publish its ACL denies; if the broker refuses our
        # state message (MQTT 5 tells us), stop sending it so it can't cost every connection.
        self.state_enabled = True
        self._state_mid: int | None = None

    @property
    def window(self) -> int:
        return self._window

    @property
    def connected(self) -> bool:
        return self._paho is not None and self._paho.connected

    def _new_client(self) -> mqtt.Client:
        client = new_client(
            self.options,
            client_id=self.client_id,
            username=self.username,
            password=self.password,
            tls=self.tls,
            clean=True,
        )
        if self.state_enabled:
            client.will_set(self.state_topic, b"offline", qos=1, retain=True)
        # 0 = no paho limit: the uplink keeps the window itself, so paho never queues. With a
        # limit, paho rescans every outgoing message on each PUBACK (O(window) per ack): a 50k
        # backlog drained at 18.7k msg/s instead of 32.6k (window 1000).
        client.max_inflight_messages_set(0)
        client.on_publish = self._on_publish
        return client

    async def connect(self) -> None:
        if self.connected:
            return
        client = self._new_client()
        self._paho = paho = AsyncPaho(client, on_lost=self._lost, after_read=self._deliver)
        self._mids.clear()
        self._acked.clear()
        self._refused.clear()
        kwargs: dict[str, Any] = {}
        if self.options.version == "5":
            kwargs["clean_start"] = True
        _flags, _reason, props = await paho.connect(
            self.host,
            self.port,
            self.options.keepalive_s,
            timeout_s=self.connect_timeout_s,
            **kwargs,
        )
        # paho doesn't honour an MQTT 5 Receive Maximum; exceeding it is a protocol error.
        receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.server_receive_maximum = int(receive_max) if receive_max else None
        self._window = min(
            self.options.inflight, self.server_receive_maximum or self.options.inflight
        )
        if self.state_enabled:
            self._state_mid = client.publish(self.state_topic, b"online", qos=1, retain=True).mid
        log.info("connected to %s as %s (window %d)", self.safe_url, self.client_id, self._window)

    def publish(self, batch: Sequence[OutMessage]) -> None:
        paho = self._paho
        if paho is None or not paho.connected:
            raise UplinkError(f"not connected to {self.safe_url}")
        client = paho.client
        mids = self._mids
        for seq, topic, payload in batch:
            info = client.publish(topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise UplinkError(
                    f"publish to {self.safe_url} failed: {mqtt.error_string(info.rc)}"
                )
            mids[info.mid] = seq

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        seq = self._mids.pop(mid, None)
        if seq is None:
            if mid == self._state_mid and reason.is_failure:
                self.state_enabled = False
                log.warning(
                    "%s refused %s (%s): no more online/offline state messages",
                    self.safe_url,
                    self.state_topic,
                    reason,
                )
            return
        if reason.is_failure:
            # An MQTT 5 PUBACK >= 0x80 (not authorized, quota exceeded...) is no acknowledgement.
            self._refused.append(seq)
            self._refused_reason = str(reason)
        else:
            self._acked.append(seq)

    def _deliver(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.listener.sink_acked(acked)
        if self._refused:
            refused, self._refused = self._refused, []
            self.listener.sink_refused(refused, self._refused_reason)

    def _lost(self, reason: str) -> None:
        self._deliver()  # acks read in the same burst as the disconnect still count
        self.listener.sink_lost(reason)

    async def close(self) -> None:
        paho, self._paho = self._paho, None
        if paho is None:
            return
        if paho.connected:
            if self.state_enabled:
                with contextlib.suppress(Exception):
                    paho.client.publish(self.state_topic, b"offline", qos=1, retain=True)
            await paho.disconnect()
        else:
            paho.abort()
        self._deliver()
