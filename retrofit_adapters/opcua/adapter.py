"""The `opcua` adapter: one asyncua session per open(), every tag resolved and checked at open, one
subscription whose data changes are buffered between the supervisor's reads (or one Read service
call per read in poll mode), and writes limited to allow-listed tags in their node's data type.

Reconnecting is the supervisor's job: the asyncua client runs without auto-reconnect, and a
session that is lost (socket closed, keep-alive probe unanswered, subscription silent) makes the
next read() raise, so the supervisor closes, backs off and opens again, which re-creates the
session and the subscription from scratch: values resume after a server restart.
This is the only module that imports asyncua.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncua
import asyncua.client.client
import asyncua.client.ua_client
import asyncua.common.ua_utils
import asyncua.crypto.security_policies
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.config.fragments import DeviceBase
from gateway.errors import BadData, DeviceError, DeviceTimeout
from gateway.model import Quality, Value
from retrofit_adapters.base import CAP_READ, CAP_SUBSCRIBE, CAP_WRITE, Adapter, Reading
from retrofit_adapters.opcua.config import (
    BrowsePathRef,
    NodeIdRef,
    OpcUaDevice,
    OpcUaSecurity,
    OpcUaTag,
)

# asyncua's annotations are partial (NewType'd integers, implicit re-exports) and strict mypy
# rejects its own examples; it is used through Any, and what it returns is checked where used.
ua: Any = asyncua.ua
Client: Any = asyncua.client.client.Client
UaClientState: Any = asyncua.client.ua_client.UaClientState
SecurityPolicyBasic256Sha256: Any = asyncua.crypto.security_policies.SecurityPolicyBasic256Sha256
data_type_to_variant_type: Any = asyncua.common.ua_utils.data_type_to_variant_type

log = logging.getLogger("fogmesh.opcua")
_T = TypeVar("_T")

MAX_BUFFERED = 10_000  # readings kept between two reads; the oldest are dropped and counted beyond
MAX_QUEUE_SIZE = 100  # server-side queue per monitored item, so changes between publishes survive
APPLICATION_URI = "urn:fogmesh:gateway"  # without a client certificate (else the certificate's)
PRODUCT_URI = "urn:fogmesh"
_REQUEST_SHARE = 0.9  # a request times out a little before the supervisor's timeout_ms
_SILENCE_FACTOR = 2.0  # keep-alive periods without any publish response before the session is dead
_MIN_SESSION_TIMEOUT_S = 30.0
_CLOSED = "the server closed the connection, or the network dropped it"
_CLOSE_POLITELY_S = 1.0  # at most this long for CloseSession on close(); then the socket is dropped

_POLICY_URIS = {
    "None": "http://opcfoundation.org/UA/SecurityPolicy#None",
    "Basic256Sha256": SecurityPolicyBasic256Sha256.URI,
}
_MODES = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
# Hints for the status codes an operator can do something about.
_HINTS = {
    "BadCertificateUntrusted": "the server does not trust the client certificate; add it to the "
    "server's trusted certificates",
    "BadSecurityChecksFailed": "the server rejected the client certificate or the channel's "
    "security; check both certificates",
    "BadCertificateUriInvalid": "the application URI in the client certificate is not accepted",
    "BadCertificateTimeInvalid": "a certificate has expired or is not valid yet",
    "BadUserAccessDenied": "check `username` and `password`",
    "BadIdentityTokenInvalid": "check `username` and `password`",
    "BadIdentityTokenRejected": "check `username` and `password`",
    "BadTooManySessions": "the server has no free session; close other clients",
    "BadSecurityPolicyRejected": "check [devices.security]",
    "BadTypeMismatch": "the value does not match the node's data type",
    "BadNotWritable": "the node is read-only on the server",
}
# OPC-UA integer types and the values they hold.
_INT_RANGES: dict[Any, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
_BUILTIN_TYPES = {vt.value: vt for vt in ua.VariantType if 1 <= vt.value <= 25}


@dataclass(slots=True)
class _Node:
    """One tag's node as resolved at open."""

    tag: OpcUaTag
    nodeid: Any  # ua.NodeId
    variant: Any = None  # writable tags: the type to write (None: ask the value)
    array: bool = False  # writable tags: the node holds arrays


class _Handler:
    """asyncua's subscription callbacks for one open(); stale ones are ignored after close()."""

    def __init__(self, adapter: OpcUaAdapter, generation: int) -> None:
        self._adapter = adapter
        self._generation = generation

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self._adapter._on_data_change(self._generation, data.monitored_item)

    def status_change_notification(self, status: Any) -> None:
        self._adapter._on_status_change(self._generation, status)


class OpcUaAdapter(Adapter):
    """An OPC-UA server as one device: subscribe (default) or poll its tags, write allowed ones.

    `password` is the resolved secret of `cfg.password` (the config holds only its reference);
    it is used only together with `cfg.username`.
    """

    type_name = "opcua"
    config_model = OpcUaDevice
    capabilities = frozenset({CAP_READ, CAP_WRITE, CAP_SUBSCRIBE})

    def __init__(
        self,
        cfg: DeviceBase,
        *,
        password: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        super().__init__(cfg, clock=clock)
        if not isinstance(cfg, OpcUaDevice):
            raise TypeError(f"OpcUaAdapter needs an OpcUaDevice, got {type(cfg).__name__}")
        self._dev = cfg
        names = [t.name for t in cfg.tags]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DeviceError(
                f"opcua device {cfg.id!r}: duplicate tag {', '.join(map(repr, dupes))}"
            )
        if cfg.password is not None and password is None:
            raise DeviceError(
                f"opcua device {cfg.id!r}: `password` is configured but was not passed to the "
                "adapter (the runtime resolves it)"
            )
        self._password = password
        self._tags = {t.name: t for t in cfg.tags}
        self._request_timeout_s = cfg.timeout_ms / 1000.0 * _REQUEST_SHARE
        self._client: Any = None  # asyncua Client while open (or half open)
        self._subscription: Any = None
        self._nodes: dict[str, _Node] = {}
        self._per_read = 0  # the server's operation limits, 0: none; read at open
        self._per_translate = 0
        self._per_monitor = 0
        self._handles: dict[int, str] = {}  # monitored item client handle -> tag
        self._generation = 0  # bumped by close(); callbacks of older sessions are ignored
        self._ready = False
        self._lost: str | None = None  # why the session died, from asyncua's callbacks
        self._opened_at = 0.0  # time.monotonic() (asyncua's clock) of the last successful open
        self._buffer: deque[Reading] = deque(maxlen=max_buffered)
        self._last_value: dict[str, Value] = {}  # for notifications that carry a status only
        self._warned_unpinned = False
        self._warned_plaintext = False
        self.buffer_overflow_total = 0  # readings dropped because reads came too rarely
        self.unusable_values_total = 0  # arrays, structures, NaN, null values: reported as BAD
        self.no_value_total = 0  # bad or unusable values before any good one: not reported
        self._warned_tags: set[str] = set()
        self._overflow_reported = 0

    # --- the contract ------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            await self.close()
        try:
            await self._open()
        except asyncio.CancelledError:  # the supervisor's timeout: let go at once
            self._drop()
            raise
        except Exception:
            await self.close()  # politely: some servers have few sessions to spare
            raise

    async def _open(self) -> None:
        self._lost = None
        dev = self._dev
        client = Client(
            dev.endpoint,
            timeout=self._request_timeout_s,
            watchdog_intervall=dev.keepalive_s,
        )
        self._client = client  # from here on close() cleans up, whatever happens below
        client.name = "fogmesh gateway"
        client.description = f"fogmesh {dev.id}"  # the session name the server shows
        client.application_uri = APPLICATION_URI
        client.product_uri = PRODUCT_URI
        client.session_timeout = max(_MIN_SESSION_TIMEOUT_S, 4 * dev.keepalive_s) * 1000
        generation = self._generation

        async def lost(exc: Exception) -> None:
            if generation == self._generation:  # not a late word about a closed session
                self._on_connection_lost(exc)

        client.connection_lost_callback = lost
        with self._boundary(f"connect to {dev.endpoint}", prefix_own=True):
            endpoints = await client.connect_and_get_server_endpoints()
            endpoint = self._choose_endpoint(endpoints)
            if dev.security.policy != "None":
                await self._set_security(client, endpoint)
            if dev.username is not None:
                client.set_user(dev.username)
                if self._password is not None:
                    client.set_password(self._password)
            await client.connect(auto_reconnect=False)
            _quiet_publish_loop_on_loss(client)
        with self._boundary("resolve nodes"):
            await self._read_limits(client)
            self._nodes = await self._resolve(client)
        if dev.mode == "subscribe":
            with self._boundary("subscribe"):
                await self._subscribe(client)
        self._opened_at = time.monotonic()
        self._ready = True

    async def read(self) -> list[Reading]:
        if self._dev.mode == "poll":
            self._check_session()
            with self._boundary("read"):
                return await self._poll()
        # Changes that arrived before a failure are still good data: hand them over first.
        if not self._buffer:
            self._check_session()
            self._check_subscription()
        out = list(self._buffer)
        self._buffer.clear()
        if self.buffer_overflow_total != self._overflow_reported:
            log.warning(
                "device %s: %d readings dropped since the last read (buffer of %d full)",
                self._dev.id,
                self.buffer_overflow_total - self._overflow_reported,
                self._buffer.maxlen,
            )
            self._overflow_reported = self.buffer_overflow_total
        return out

    async def write(self, tag: str, value: Value) -> None:
        cfg = self._tags.get(tag)
        if cfg is None:
            known = ", ".join(self._tags)
            raise DeviceError(f"no tag {tag!r}; tags are: {known}")
        if not cfg.writable:
            raise DeviceError(f"tag {tag!r} is not writable")
        _check_limits(cfg, value)
        self._check_session()
        node = self._nodes[tag]
        if node.array:
            raise DeviceError(
                f"tag {tag!r}: the node holds an array; writing arrays is not supported"
            )
        with self._boundary(f"write tag {tag!r}"):
            vtype = node.variant or await self._current_variant_type(node)
            encoded = _encode(tag, value, vtype)
            params = ua.WriteParameters()
            item = ua.WriteValue()
            item.NodeId = node.nodeid
            item.AttributeId = ua.AttributeIds.Value
            # Value only: many servers refuse writes that carry a status or timestamps.
            item.Value = ua.DataValue(ua.Variant(encoded, vtype), StatusCode=None)
            params.NodesToWrite = [item]
            results = await self._client.uaclient.write(params)
        status = results[0] if results else None
        if status is None or not status.is_good():
            raise DeviceError(f"tag {tag!r}: the server refused the write: {_status_text(status)}")
        log.info("device %s: wrote tag %r = %r (%s)", self._dev.id, tag, encoded, vtype.name)

    async def close(self) -> None:
        client = self._forget()
        if client is None:
            return
        try:
            if client.state is UaClientState.CONNECTED:
                # CloseSession also deletes the subscription on the server; a server that does
                # not answer quickly is left to its session timeout.
                async with asyncio.timeout(min(_CLOSE_POLITELY_S, self._request_timeout_s)):
                    await client.disconnect()
        except Exception as exc:  # TimeoutError included: nothing more to do with this session
            log.debug("device %s: closing the session: %r", self._dev.id, exc)
        finally:
            _abandon(client)

    def _forget(self) -> Any:
        """Forget the session (its late callbacks included); return its client to dispose of."""
        self._ready = False
        self._generation += 1
        client, self._client = self._client, None
        self._subscription = None
        self._handles = {}
        return client

    def _drop(self) -> None:
        client = self._forget()
        if client is not None:
            _abandon(client)

    # --- open --------------------------------------------------------------------------

    def _choose_endpoint(self, endpoints: Sequence[Any]) -> Any:
        sec = self._dev.security
        policy_uri, mode = _POLICY_URIS[sec.policy], _MODES[sec.mode]
        match = next(
            (e for e in endpoints if e.SecurityPolicyUri == policy_uri and e.SecurityMode == mode),
            None,
        )
        if match is None:
            offered = ", ".join(_describe_endpoint(e) for e in endpoints) or "nothing"
            raise DeviceError(
                f"the server offers no endpoint with security {sec.policy}/{sec.mode} "
                f"(it offers {offered}); set [devices.security] to one of them"
            )
        tokens = {int(t.TokenType) for t in match.UserIdentityTokens or []}
        accepted = ", ".join(sorted(ua.UserTokenType(t).name for t in tokens)) or "nothing"
        if self._dev.username is None and int(ua.UserTokenType.Anonymous) not in tokens:
            raise DeviceError(
                f"the server refuses anonymous sessions (it accepts {accepted}); "
                "set `username` and `password`"
            )
        if self._dev.username is not None and int(ua.UserTokenType.UserName) not in tokens:
            raise DeviceError(
                f"the server accepts no user name on this endpoint (it accepts {accepted})"
            )
        if self._password is not None and not self._warned_plaintext:
            policy = next(
                (
                    t
                    for t in match.UserIdentityTokens or []
                    if t.TokenType == ua.UserTokenType.UserName
                ),
                None,
            )
            token_policy = (policy.SecurityPolicyUri if policy else None) or match.SecurityPolicyUri
            if mode != _MODES["SignAndEncrypt"] and token_policy in (
                None,
                "",
                _POLICY_URIS["None"],
            ):
                self._warned_plaintext = True
                log.warning(
                    "device %s: the password travels unencrypted on this endpoint; use security "
                    "Basic256Sha256 with mode SignAndEncrypt",
                    self._dev.id,
                )
        return match

    async def _set_security(self, client: Any, endpoint: Any) -> None:
        sec = self._dev.security
        cert, key, pinned = await asyncio.to_thread(_load_security_files, sec)
        offered = _first_certificate(endpoint.ServerCertificate)
        if pinned is not None:
            if offered is not None and offered != pinned:
                raise DeviceError(
                    "the server's certificate does not match `server_certificate_file` "
                    f"(the server presents {_cert_summary(offered)})"
                )
            server_cert = pinned
        else:
            if offered is None:
                raise DeviceError("the server's endpoint has no certificate")
            server_cert = offered
            if not self._warned_unpinned:
                self._warned_unpinned = True
                log.warning(
                    "device %s: the server's certificate is accepted as presented (%s); set "
                    "`server_certificate_file` to pin it",
                    self._dev.id,
                    _cert_summary(offered),
                )
        uri = _certificate_uri(cert)
        if uri is None:
            log.warning(
                "device %s: the client certificate has no application URI (subjectAltName URI); "
                "most servers refuse it",
                self._dev.id,
            )
        else:
            client.application_uri = uri
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            cert,
            key,
            server_certificate=server_cert,
            mode=_MODES[sec.mode],
        )

    async def _read_limits(self, client: Any) -> None:
        """How many nodes the server takes per request (a PLC may take a few hundred only)."""
        ids = ua.ObjectIds
        limits = [
            ids.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            ids.Server_ServerCapabilities_OperationLimits_MaxNodesPerTranslateBrowsePathsToNodeIds,
            ids.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
        ]
        values = await _read(client, [(ua.NodeId(i), ua.AttributeIds.Value) for i in limits])
        found = []
        for dv in values:  # optional nodes: a Bad status or no value means no limit
            v = dv.Value.Value if dv.Value is not None else None
            ok = dv.StatusCode is None or dv.StatusCode.is_good()
            found.append(v if ok and isinstance(v, int) and v > 0 else 0)
        self._per_read, self._per_translate, self._per_monitor = found

    async def _resolve(self, client: Any) -> dict[str, _Node]:
        tags = self._dev.tags
        refs = {t.name: t.node_ref() for t in tags}
        nodeids: dict[str, Any] = {}
        uris = {
            r.namespace_uri for r in refs.values() if isinstance(r, NodeIdRef) and r.namespace_uri
        }
        namespaces: list[str] = await client.get_namespace_array() if uris else []
        for name, ref in refs.items():
            if isinstance(ref, NodeIdRef):
                ns = ref.namespace
                if ref.namespace_uri is not None:
                    if ref.namespace_uri not in namespaces:
                        raise DeviceError(
                            f"tag {name!r}: the server has no namespace {ref.namespace_uri!r}"
                        )
                    ns = namespaces.index(ref.namespace_uri)
                nodeids[name] = _nodeid(ref, ns)
        paths = [(name, ref) for name, ref in refs.items() if isinstance(ref, BrowsePathRef)]
        results: list[Any] = []
        for chunk in _chunks([_browse_path(ref) for _, ref in paths], self._per_translate):
            results += await client.uaclient.translate_browsepaths_to_nodeids(chunk)
        if len(results) != len(paths):
            raise BadData(f"the server translated {len(results)} of {len(paths)} browse paths")
        for (name, _), result in zip(paths, results, strict=True):
            target = _only_target(result)
            if target is None:
                status = _status_text(result.StatusCode)
                raise DeviceError(f"tag {name!r}: no node at {self._tags[name].node} ({status})")
            nodeids[name] = target
        # One Read for what open() must know: every node's class, and how to write the writable.
        attrs: list[tuple[str, Any]] = [(t.name, ua.AttributeIds.NodeClass) for t in tags]
        for t in tags:
            if t.writable:
                attrs += [(t.name, ua.AttributeIds.DataType), (t.name, ua.AttributeIds.ValueRank)]
        values = await _read(client, [(nodeids[n], a) for n, a in attrs], self._per_read)
        nodes = {t.name: _Node(t, nodeids[t.name]) for t in tags}
        for (name, attr), dv in zip(attrs, values, strict=True):
            node = nodes[name]
            where = f"tag {name!r}: node {node.tag.node}"
            status = dv.StatusCode
            if status is not None and not status.is_good():
                if attr == ua.AttributeIds.NodeClass:
                    raise DeviceError(
                        f"tag {name!r}: no node {node.tag.node} ({_status_text(status)})"
                    )
                raise DeviceError(f"{where}: cannot read its {attr.name} ({_status_text(status)})")
            v = dv.Value.Value if dv.Value is not None else None
            if attr == ua.AttributeIds.NodeClass:
                if v != ua.NodeClass.Variable:
                    kind = ua.NodeClass(v).name if isinstance(v, int) else repr(v)
                    article = "an" if kind[:1] in "AEIOU" else "a"
                    raise DeviceError(f"{where} is {article} {kind} node, not a Variable")
            elif attr == ua.AttributeIds.DataType:
                node.variant = await _variant_type(client, v)
            elif attr == ua.AttributeIds.ValueRank:
                node.array = isinstance(v, int) and v >= 0
        return nodes

    async def _subscribe(self, client: Any) -> None:
        dev = self._dev
        interval = dev.publishing_interval_ms
        keepalive = max(1, math.ceil(dev.keepalive_s * 1000.0 / interval))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = keepalive * 6  # the spec wants at least 3 keep-alives
        params.MaxNotificationsPerPublish = 0  # no limit
        params.PublishingEnabled = True
        params.Priority = 0
        sub = await client.create_subscription(params, _Handler(self, self._generation))
        self._subscription = sub
        requests = []
        handles: dict[int, str] = {}
        for handle, tag in enumerate(dev.tags, start=1):
            handles[handle] = tag.name
            requests.append(self._monitored_item(handle, tag))
        self._handles = handles
        results: list[Any] = []
        for chunk in _chunks(requests, self._per_monitor):
            results += await sub.create_monitored_items(chunk)
        refused = [
            f"tag {tag.name!r} ({_status_text(r)})"
            for tag, r in zip(dev.tags, results, strict=True)
            if isinstance(r, ua.StatusCode)
        ]
        if refused:
            raise DeviceError(f"the server refused to monitor {', '.join(refused)}")

    def _monitored_item(self, handle: int, tag: OpcUaTag) -> Any:
        sampling = self._dev.sampling_interval_ms(tag)
        # Enough room on the server for every sample between two publishes, within reason.
        # Servers that report on change rather than sample can produce bursts: keep a few more.
        queue = max(math.ceil(self._dev.publishing_interval_ms / max(sampling, 1.0)) + 1, 10)
        item = ua.MonitoredItemCreateRequest()
        item.ItemToMonitor = ua.ReadValueId()
        item.ItemToMonitor.NodeId = self._nodes[tag.name].nodeid
        item.ItemToMonitor.AttributeId = ua.AttributeIds.Value
        item.MonitoringMode = ua.MonitoringMode.Reporting
        mp = ua.MonitoringParameters()
        mp.ClientHandle = handle
        mp.SamplingInterval = sampling
        mp.QueueSize = min(max(queue, 1), MAX_QUEUE_SIZE)
        mp.DiscardOldest = True
        if tag.server_deadband is not None:
            flt = ua.DataChangeFilter()
            flt.Trigger = ua.DataChangeTrigger.StatusValue
            flt.DeadbandType = ua.DeadbandType.Absolute
            flt.DeadbandValue = tag.server_deadband
            mp.Filter = flt
        item.RequestedParameters = mp
        return item

    # --- read --------------------------------------------------------------------------

    def _check_session(self) -> None:
        client = self._client
        if client is None or not self._ready:
            raise DeviceError("not connected")
        if self._lost is not None:
            raise DeviceError(f"connection lost: {self._lost}")
        state = client.state
        if state is UaClientState.DISCONNECTED:
            # the socket closed; asyncua reports it to _on_connection_lost a moment later
            raise DeviceError(f"connection lost: {_CLOSED}")
        if state is not UaClientState.CONNECTED:
            raise DeviceError(f"connection lost ({state.value})")

    def _check_subscription(self) -> None:
        sub = self._subscription
        if sub is None:
            raise DeviceError("no subscription")
        # The server answers a publish request at least every keep-alive period, with data or
        # an empty keep-alive; asyncua stamps each answer. Silence means the session is gone.
        p = sub.parameters
        period_s = max(
            self._dev.keepalive_s,
            float(p.RequestedPublishingInterval) * max(int(p.RequestedMaxKeepAliveCount), 1) / 1000,
        )
        last = max(sub.last_publish_at or 0.0, self._opened_at)
        silent = time.monotonic() - last
        if silent > _SILENCE_FACTOR * period_s + self._dev.publishing_interval_ms / 1000:
            raise DeviceError(
                f"no data or keep-alive from the server for {silent:.1f} s "
                f"(keepalive_s = {self._dev.keepalive_s:g})"
            )

    async def _poll(self) -> list[Reading]:
        nodes = list(self._nodes.values())
        items = [(n.nodeid, ua.AttributeIds.Value) for n in nodes]
        values = await _read(self._client, items, self._per_read)
        out: list[Reading] = []
        for node, dv in zip(nodes, values, strict=True):
            r = self._reading(node.tag.name, dv)
            if r is not None:
                out.append(r)
        return out

    def _on_data_change(self, generation: int, item: Any) -> None:
        if generation != self._generation:
            return  # a notification of a session closed since
        try:
            tag = self._handles.get(int(item.ClientHandle))
            if tag is None:
                return
            reading = self._reading(tag, item.Value)
        except Exception:  # a malformed notification must not end the subscription
            log.exception("device %s: unusable data change notification", self._dev.id)
            return
        if reading is None:
            return
        if len(self._buffer) == self._buffer.maxlen:
            self.buffer_overflow_total += 1
        self._buffer.append(reading)

    def _on_status_change(self, generation: int, status: Any) -> None:
        if generation != self._generation:
            return
        code = getattr(status, "Status", None)
        if isinstance(code, ua.StatusCode) and code.is_good():
            return
        if self._lost is None:
            self._lost = f"the subscription ended ({_status_text(code)})"

    def _on_connection_lost(self, exc: Exception) -> None:
        if self._lost is not None:
            return
        if isinstance(exc, TimeoutError):
            self._lost = f"no answer to the keep-alive probe within {self._dev.keepalive_s:g} s"
        elif isinstance(exc, ua.UaStatusCodeError):
            self._lost = _error_text(exc)
        elif isinstance(exc, ConnectionError | OSError):
            self._lost = _CLOSED
        else:
            self._lost = str(exc) or type(exc).__name__

    def _reading(self, tag: str, dv: Any) -> Reading | None:
        """One DataValue as a Reading: value converted, status as quality, source timestamp.

        A Bad status means the value is to be ignored (OPC-UA Part 4, 7.7.1), and a value that
        cannot travel (an array, a structure, NaN, nothing) is no better: both are reported as
        the last value known with BAD quality, or not at all before a first good value. They are
        not left to the supervisor, for which a read of nothing but bad data is a failure and a
        reconnect: one odd node changing on its own would make the device flap.
        """
        if dv is None:
            return None
        status = dv.StatusCode
        if status is None or status.is_good():
            quality = Quality.GOOD
        elif status.is_uncertain():
            quality = Quality.UNCERTAIN
        else:
            quality = Quality.BAD
        ts = _epoch(dv)
        raw = dv.Value.Value if dv.Value is not None else None
        if quality is not Quality.BAD:
            value = _to_value(raw)
            if isinstance(value, bool | int | float | str) and (
                not isinstance(value, float) or math.isfinite(value)
            ):
                self._last_value[tag] = value
                return Reading(tag, value, quality, ts)
            self._unusable(tag, value)
            quality = Quality.BAD
        last = self._last_value.get(tag)
        if last is None:
            self.no_value_total += 1
            return None
        return Reading(tag, last, quality, ts)

    def _unusable(self, tag: str, value: object) -> None:
        self.unusable_values_total += 1
        if tag in self._warned_tags:
            return
        self._warned_tags.add(tag)  # once per tag: a node that keeps doing it would flood the log
        what = "no value" if value is None else f"a {type(value).__name__} value ({value!r:.60})"
        log.warning(
            "device %s: tag %r: the server sent %s, which cannot be forwarded; reported as bad "
            "quality",
            self._dev.id,
            tag,
            what,
        )

    async def _current_variant_type(self, node: _Node) -> Any:
        (dv,) = await _read(self._client, [(node.nodeid, ua.AttributeIds.Value)])
        vtype = dv.Value.VariantType if dv.Value is not None else ua.VariantType.Null
        if vtype in (ua.VariantType.Null, ua.VariantType.Variant):
            raise DeviceError(
                f"tag {node.tag.name!r}: the node's data type is abstract and it holds no value "
                "to take the type from"
            )
        return vtype

    # --- errors ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _boundary(self, what: str, *, prefix_own: bool = False) -> Iterator[None]:
        """Map whatever asyncua or the socket raises to DeviceError or DeviceTimeout, with `what`
        in front; the adapter's own DeviceErrors already say what failed (`prefix_own`: add it)."""
        try:
            yield
        except DeviceError as exc:
            if prefix_own:
                raise type(exc)(f"{what}: {exc}") from (exc.__cause__ or exc)
            raise
        except TimeoutError as exc:
            ms = round(self._request_timeout_s * 1000)
            raise DeviceTimeout(f"{what}: no answer within {ms} ms") from exc
        except ua.UaStatusCodeError as exc:
            raise DeviceError(f"{what}: {_error_text(exc)}") from exc
        except ua.UaError as exc:
            raise DeviceError(f"{what}: {exc}") from exc
        except ConnectionRefusedError as exc:
            raise DeviceError(f"{what}: connection refused") from exc
        except ConnectionError as exc:  # the socket closed under a request
            raise DeviceError(f"{what}: connection lost ({exc})") from exc
        except OSError as exc:
            raise DeviceError(f"{what}: {exc.strerror or exc}") from exc
        except Exception as exc:
            # asyncua is large and raises more than it documents; nothing of it escapes.
            raise DeviceError(f"{what}: unexpected {type(exc).__name__}: {exc}") from exc


# --- helpers ---------------------------------------------------------------------------------


def _abandon(client: Any) -> None:
    """Stop every task of an asyncua client and drop its socket, without talking to the server.

    asyncua's disconnect() needs an answering server and leaves the publish loop running when the
    socket is already gone; the tasks are its private attributes, read defensively.
    """
    uaclient = client.uaclient
    with contextlib.suppress(Exception):
        uaclient.request_disconnect()
    tasks = [
        getattr(client, "_supervisor_task", None),
        getattr(client, "_stale_watchdog_task", None),
        getattr(client, "_renew_channel_task", None),
        getattr(getattr(uaclient, "session", None), "_publish_task", None),
    ]
    for task in tasks:
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
    with contextlib.suppress(Exception):
        client.disconnect_socket()


def _quiet_publish_loop_on_loss(client: Any) -> None:
    """Cancel asyncua's publish loop the moment the transport is lost.

    Left alone, the loop logs the failed pending publish at ERROR with a traceback on every
    disconnect, and retries every second until close(); the supervisor reconnects anyway. The
    state listener is asyncua's internal hook (the public one is a queue, too late for this); if
    it is gone in another version, the noise is all that is lost.
    """
    uaclient = client.uaclient
    add = getattr(uaclient, "_add_state_listener", None)
    if add is None:
        return

    def on_state(state: Any) -> None:
        if state is UaClientState.DISCONNECTED:
            task = getattr(uaclient.session, "_publish_task", None)
            if isinstance(task, asyncio.Task) and not task.done():
                task.cancel()

    add(on_state)


async def _read(client: Any, items: Sequence[tuple[Any, Any]], per_call: int = 0) -> list[Any]:
    """One Read service call (or as few as the server's limit allows); each result is a
    DataValue with its own status."""
    results: list[Any] = []
    for chunk in _chunks(items, per_call):
        params = ua.ReadParameters()
        params.MaxAge = 0
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        for nodeid, attr in chunk:
            rv = ua.ReadValueId()
            rv.NodeId = nodeid
            rv.AttributeId = attr
            params.NodesToRead.append(rv)
        results += await client.uaclient.read(params)
    if len(results) != len(items):
        raise BadData(f"the server answered {len(results)} results for {len(items)} nodes read")
    return results


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """`items` in requests of at most `size` (0: one request); nothing at all for no items."""
    if not items:
        return
    if size <= 0 or len(items) <= size:
        yield items
        return
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _nodeid(ref: NodeIdRef, namespace: int) -> Any:
    kinds = {
        "i": ua.NodeIdType.Numeric,
        "s": ua.NodeIdType.String,
        "g": ua.NodeIdType.Guid,
        "b": ua.NodeIdType.ByteString,
    }
    if ref.identifier_type == "i":
        return ua.NodeId(ref.identifier, namespace)  # asyncua picks the compact encoding
    return ua.NodeId(ref.identifier, namespace, kinds[ref.identifier_type])


def _browse_path(ref: BrowsePathRef) -> Any:
    path = ua.BrowsePath()
    path.StartingNode = ua.NodeId(ua.ObjectIds.RootFolder)
    rel = ua.RelativePath()
    for ns, name in ref.elements:
        el = ua.RelativePathElement()
        el.ReferenceTypeId = ua.NodeId(ua.ObjectIds.HierarchicalReferences)
        el.IsInverse = False
        el.IncludeSubtypes = True
        el.TargetName = ua.QualifiedName(name, ns)
        rel.Elements.append(el)
    path.RelativePath = rel
    return path


def _only_target(result: Any) -> Any:
    if result.StatusCode is not None and not result.StatusCode.is_good():
        return None
    for target in result.Targets or []:
        # A remaining path index other than "none" means the path goes on in another server.
        if target.RemainingPathIndex in (0xFFFFFFFF, None):
            t = target.TargetId
            if not getattr(t, "ServerIndex", 0):  # asyncua may decode it as a plain NodeId
                return ua.NodeId(t.Identifier, t.NamespaceIndex, t.NodeIdType)
    return None


async def _variant_type(client: Any, datatype: Any) -> Any:
    """The variant type to write for a node's DataType; None when only the value can tell."""
    if not isinstance(datatype, ua.NodeId):
        return None
    if datatype.NamespaceIndex == 0 and datatype.Identifier in _BUILTIN_TYPES:
        vt = _BUILTIN_TYPES[int(datatype.Identifier)]
    else:  # a subtype (an enumeration, Duration, a vendor type): walk up to its base type
        vt = await data_type_to_variant_type(client.get_node(datatype))
    return None if vt in (ua.VariantType.Variant, ua.VariantType.Null) else vt


def _check_limits(tag: OpcUaTag, value: Value) -> None:
    if tag.min is None and tag.max is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DeviceError(
            f"tag {tag.name!r}: expected a number within its limits, got {type(value).__name__}"
        )
    lo = -math.inf if tag.min is None else tag.min
    hi = math.inf if tag.max is None else tag.max
    if not lo <= value <= hi:  # NaN fails both
        raise DeviceError(f"tag {tag.name!r}: {value!r} is out of range {_fmt(lo)}..{_fmt(hi)}")


def _encode(tag: str, value: Value, vtype: Any) -> Any:
    """`value` as the Python value asyncua encodes as `vtype`; DeviceError if it does not fit."""
    name = vtype.name
    if vtype == ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        raise DeviceError(f"tag {tag!r}: node type Boolean needs true or false, got {value!r}")
    if vtype in _INT_RANGES:
        lo, hi = _INT_RANGES[vtype]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DeviceError(f"tag {tag!r}: node type {name} needs an integer, got {value!r}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise DeviceError(f"tag {tag!r}: node type {name} needs an integer, got {value!r}")
        if not lo <= value <= hi:
            raise DeviceError(f"tag {tag!r}: {value!r} does not fit node type {name} ({lo}..{hi})")
        return int(value)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DeviceError(f"tag {tag!r}: node type {name} needs a number, got {value!r}")
        f = float(value)
        if not math.isfinite(f) or (vtype == ua.VariantType.Float and abs(f) > _FLOAT32_MAX):
            raise DeviceError(f"tag {tag!r}: {value!r} does not fit node type {name}")
        return f
    if vtype == ua.VariantType.String:
        if not isinstance(value, str):
            raise DeviceError(f"tag {tag!r}: node type String needs a string, got {value!r}")
        return value
    raise DeviceError(f"tag {tag!r}: writing node type {name} is not supported")


def _to_value(raw: Any) -> object:
    """An OPC-UA value as a plain float/int/bool/str where there is an obvious one."""
    if isinstance(raw, enum.Enum):  # asyncua decodes some integers as IntEnum/IntFlag
        raw = raw.value
    if isinstance(raw, bool | int | float | str):
        return raw
    if isinstance(raw, bytes):
        return raw.hex()
    if isinstance(raw, dt.datetime):
        return (raw if raw.tzinfo else raw.replace(tzinfo=dt.UTC)).isoformat()
    if isinstance(raw, Decimal):
        return float(raw)
    if isinstance(raw, uuid.UUID):
        return str(raw)
    if isinstance(raw, ua.LocalizedText):
        return raw.Text or ""
    if isinstance(raw, ua.QualifiedName | ua.NodeId):
        return raw.to_string()
    if isinstance(raw, ua.StatusCode):
        return raw.name
    return raw


def _epoch(dv: Any) -> float | None:
    """The source timestamp (else the server's) in epoch seconds; None when there is neither."""
    for stamp in (dv.SourceTimestamp, dv.ServerTimestamp):
        if isinstance(stamp, dt.datetime):
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.UTC)
            try:
                ts = stamp.timestamp()
            except (OverflowError, OSError, ValueError):
                continue
            if ts > 0:  # OPC-UA's null DateTime is 1601-01-01
                return ts
    return None


def _status_text(status: Any) -> str:
    if not isinstance(status, ua.StatusCode):
        return "no status"
    name = status.name
    doc = status.doc.rstrip(".")
    hint = _HINTS.get(name)
    text = f"{name} ({doc})" if doc else name
    return f"{text}; {hint}" if hint else text


def _error_text(exc: Exception) -> str:
    code = getattr(exc, "code", None)  # None for an error that carries several codes
    return _status_text(ua.StatusCode(code)) if isinstance(code, int) else str(exc)


def _describe_endpoint(e: Any) -> str:
    policy = str(e.SecurityPolicyUri).rpartition("#")[2]
    mode = ua.MessageSecurityMode(e.SecurityMode).name.rstrip("_")
    return f"{policy}/{mode}"


def _fmt(x: float) -> str:
    return f"{x:g}"


# --- certificates --------------------------------------------------------------------------


def _load_security_files(sec: OpcUaSecurity) -> tuple[bytes, bytes, bytes | None]:
    """(client certificate DER, private key DER, pinned server certificate DER or None).

    Files may be PEM or DER, whatever their extension; read at every open, so that a rotated
    certificate is picked up on the next reconnect.
    """
    assert sec.certificate_file is not None and sec.private_key_file is not None  # config checks
    cert = _load_certificate("certificate_file", sec.certificate_file)
    key = _load_private_key("private_key_file", sec.private_key_file)
    pinned = (
        None
        if sec.server_certificate_file is None
        else _load_certificate("server_certificate_file", sec.server_certificate_file)
    )
    return cert, key, pinned


def _read_file(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeviceError(f"security.{key} '{path}': {exc.strerror or exc}") from exc


def _load_certificate(key: str, path: str) -> bytes:
    data = _read_file(key, path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise DeviceError(
            f"security.{key} '{path}': not an X.509 certificate (PEM or DER)"
        ) from exc
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise DeviceError(
            f"security.{key} '{path}': the certificate is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return cert.public_bytes(serialization.Encoding.DER)


def _load_private_key(key: str, path: str) -> bytes:
    data = _read_file(key, path)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            pk = serialization.load_pem_private_key(data, password=None)
        else:
            pk = serialization.load_der_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "this key needs a password"
        raise DeviceError(
            f"security.{key} '{path}': the key is encrypted; give an unencrypted key and "
            "protect the file instead"
        ) from exc
    except ValueError as exc:
        raise DeviceError(f"security.{key} '{path}': not a private key (PEM or DER)") from exc
    return pk.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _first_certificate(der: Any) -> bytes | None:
    """The leading certificate of what a server sends (some send their chain appended)."""
    if not isinstance(der, bytes) or not der:
        return None
    try:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.DER)
    except ValueError:
        length = int.from_bytes(der[2:4], "big") + 4  # a DER SEQUENCE with a two-byte length
        return der[:length]


def _certificate_uri(der: bytes) -> str | None:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _cert_summary(der: bytes) -> str:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "an unreadable certificate"
    thumb = cert.fingerprint(hashes.SHA1()).hex()
    return f"{cert.subject.rfc4514_string()}, SHA-1 thumbprint {thumb}"
