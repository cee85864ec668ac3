"""A small asyncua server for the opcua adapter's tests: a pump with variables of several types on
127.0.0.1, which a test can stop, restart on the same port, freeze, or secure with certificates
generated here.

The server runs in its own thread with its own event loop, so it behaves like a separate process
for the adapter under test (a frozen server does not freeze the client), and one server can serve
every test of a module although each test runs its own `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncua.ua
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.server import Server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tools.net import free_port

_T = TypeVar("_T")
# asyncua's annotations (NewType'd integers, implicit re-exports) do not pass strict mypy
ua: Any = asyncua.ua

NAMESPACE_URI = "urn:fogmesh:test:plant"
SERVER_URI = "urn:fogmesh:test:server"
PATH = "/fogmesh/test"
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Var:
    """One variable of the test pump: where it is and what it holds at start."""

    nodeid: str  # "ns=2;..." once the namespace is registered (it is always index 2 here)
    variant: Any  # ua.VariantType
    initial: Any
    writable: bool = False  # writable by clients (the server itself can always write)
    lenient: bool = False  # the server accepts any variant type here (a device gone wrong)


# Every variable sits under Objects/2:Plant/2:Pump1 with its name as browse name.
VARIABLES: dict[str, Var] = {
    "Flow": Var("ns=2;s=Pump1.Flow", ua.VariantType.Double, 40.0),
    "Pressure": Var("ns=2;s=Pump1.Pressure", ua.VariantType.Float, 4.0),
    "Running": Var("ns=2;s=Pump1.Running", ua.VariantType.Boolean, True),
    "Starts": Var("ns=2;s=Pump1.Starts", ua.VariantType.Int32, 7),
    "Total": Var("ns=2;s=Pump1.Total", ua.VariantType.UInt64, 2**40),
    "Level": Var("ns=2;i=1001", ua.VariantType.Double, 2.5),
    "Mode": Var("ns=2;s=Pump1.Mode", ua.VariantType.String, "auto", writable=True),
    "Speed": Var("ns=2;s=Pump1.Speed", ua.VariantType.UInt16, 1500, writable=True),
    "Setpoint": Var("ns=2;s=Pump1.Setpoint", ua.VariantType.Double, 50.0, writable=True),
    "Trim": Var("ns=2;s=Pump1.Trim", ua.VariantType.Float, 0.5, writable=True),
    "Enabled": Var("ns=2;s=Pump1.Enabled", ua.VariantType.Boolean, False, writable=True),
    "Raw": Var("ns=2;s=Pump1.Raw", ua.VariantType.Int32, 7, lenient=True),
    "Locked": Var("ns=2;s=Pump1.Locked", ua.VariantType.Double, 1.0),  # not writable by clients
    "Serial": Var("ns=2;s=Pump1.Serial", ua.VariantType.ByteString, b"\x01\xab"),
    "Curve": Var("ns=2;s=Pump1.Curve", ua.VariantType.Double, [1.0, 2.0, 3.0]),
    "Serviced": Var(
        "ns=2;s=Pump1.Serviced",
        ua.VariantType.DateTime,
        dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
    ),
    "Stamp": Var(
        "ns=2;s=Pump1.Stamp", ua.VariantType.DateTime, dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    ),
}
BROWSE_PREFIX = "/Objects/2:Plant/2:Pump1/2:"


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPair:
    cert: Path  # PEM
    key: Path  # PEM, unencrypted
    uri: str  # the application URI in the certificate's subjectAltName

    @property
    def der(self) -> bytes:
        data = self.cert.read_bytes()
        if not data.startswith(b"-----BEGIN"):
            return data
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def make_cert_pair(
    directory: Path, name: str, uri: str, *, days: int = 30, der: bool = False
) -> CertPair:
    """A self-signed OPC-UA application instance certificate and its RSA key.

    OPC-UA wants the application URI as a URI subjectAltName, the host in the DNS/IP names, and
    key usages that allow signing and key encipherment.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fogmesh tests"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName("localhost"),
                    x509.DNSName(socket.gethostname()),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.{'der' if der else 'pem'}"
    key_path = directory / f"{name}-key.pem"
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    cert_path.write_bytes(cert.public_bytes(encoding))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return CertPair(cert=cert_path, key=key_path, uri=uri)


# --- the server -----------------------------------------------------------------------------

_MODES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}


def _lenient(server: Server, nodeids: set[Any]) -> None:
    """Let the server store values of any variant type in these nodes.

    asyncua refuses a write whose variant type differs from the stored value's, even from the
    server itself; real devices are not always that careful, and the adapter must cope.
    """
    aspace = server.iserver.aspace
    check = aspace._is_expected_variant_type

    def expected(value: Any, attval: Any, node: Any) -> bool:
        return node.nodeid in nodeids or bool(check(value, attval, node))

    aspace._is_expected_variant_type = expected  # type: ignore[method-assign]


class _Users:
    """A user manager that knows a few username/password pairs and nobody else."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is not None and self._users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


class OpcUaTestServer:
    """The test pump as an OPC-UA server on `endpoint`; `start()`, `stop()`, `restart()`.

    `security`: the endpoints offered, any of "None", "Sign", "SignAndEncrypt" (Basic256Sha256);
    secure endpoints need `certificate`. `trusted_clients`: when given, only these client
    certificates are accepted. `users`: when given, anonymous sessions are refused.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        security: Iterable[str] = ("None",),
        certificate: CertPair | None = None,
        trusted_clients: Iterable[CertPair] | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}{PATH}"
        self.security = tuple(security)
        unknown = [s for s in self.security if s not in _MODES]
        if unknown:
            raise ValueError(f"unknown security modes {unknown}")
        if certificate is None and any(s != "None" for s in self.security):
            raise ValueError("secure endpoints need a server certificate")
        self.certificate = certificate
        self.trusted = None if trusted_clients is None else {c.der for c in trusted_clients}
        self.users = None if users is None else dict(users)
        self.starts = 0  # how many times the server was started
        self._server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"opcua-server-{self.port}", daemon=True
        )
        self._thread.start()

    # --- lifecycle (called from the test's thread) ----------------------------------------

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> Self:
        self._call(self._start())
        return self

    def stop(self) -> None:
        self._call(self._stop())

    def restart(self) -> None:
        """Stop, then start a fresh server (a new address space) on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self._call(self._cancel_leftovers())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # From a test's event loop, the blocking calls go through a thread so that the adapter under
    # test keeps running while the server stops or starts.
    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def aset(self, name: str, value: Any, **kw: Any) -> None:
        await asyncio.to_thread(self.set, name, value, **kw)

    async def aget(self, name: str) -> Any:
        return await asyncio.to_thread(self.get, name)

    def freeze(self, seconds: float) -> None:
        """Block the server's event loop: the socket stays open but nothing answers."""
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    # --- values (server side: bypasses access levels and type checks) ---------------------

    def set(
        self,
        name: str,
        value: Any,
        *,
        variant: Any = None,  # ua.VariantType
        status: int | None = None,
        source_ts: dt.datetime | None = None,
    ) -> None:
        """Set a variable as the device would: any value, any variant type, any status code."""
        var = VARIABLES[name]
        vtype = var.variant if variant is None else variant
        dv = ua.DataValue(
            ua.Variant(value, vtype) if value is not None else ua.Variant(),
            StatusCode=ua.StatusCode(ua.StatusCodes.Good if status is None else status),
            SourceTimestamp=source_ts or dt.datetime.now(dt.UTC),
            ServerTimestamp=dt.datetime.now(dt.UTC),
        )
        self._call(self._node(name).write_value(dv))

    def set_operation_limit(self, which: str, n: int) -> None:
        """Set one of ServerCapabilities/OperationLimits, e.g. "MaxNodesPerRead" (0: none)."""
        nodeid = ua.NodeId(
            getattr(ua.ObjectIds, f"Server_ServerCapabilities_OperationLimits_{which}")
        )
        node = self._node_by_id(nodeid)
        self._call(node.write_value(ua.Variant(n, ua.VariantType.UInt32)))

    def get(self, name: str) -> Any:
        return self._call(self._node(name).read_value())

    def get_variant_type(self, name: str) -> Any:
        dv: Any = self._call(self._node(name).read_data_value())
        return dv.Value.VariantType

    # --- inside the server's loop ---------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT_S)

    def _node(self, name: str) -> Node:
        return self._node_by_id(VARIABLES[name].nodeid)

    def _node_by_id(self, nodeid: Any) -> Node:
        if self._server is None:
            raise RuntimeError("the test server is not running")
        return self._server.get_node(nodeid)

    async def _start(self) -> None:
        if self._server is not None:
            return
        users: Any = _Users(self.users) if self.users is not None else None
        server = Server(user_manager=users)
        await server.init()
        # The clock task only updates ServerStatus.CurrentTime, and makes stop() take a second.
        server.disable_clock()
        server.set_endpoint(self.endpoint)
        server.set_server_name("fogmesh test pump")
        await server.set_application_uri(SERVER_URI)
        server.set_security_policy([_MODES[s] for s in self.security])
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.certificate is not None:
            await server.load_certificate(str(self.certificate.cert))
            await server.load_private_key(str(self.certificate.key))
        if self.trusted is not None:
            server.set_certificate_validator(self._validate)
        idx = await server.register_namespace(NAMESPACE_URI)
        assert idx == 2, idx
        plant = await server.nodes.objects.add_folder("ns=2;s=Plant", "2:Plant")
        pump = await plant.add_object("ns=2;s=Pump1", "2:Pump1")
        for name, var in VARIABLES.items():
            node = await pump.add_variable(var.nodeid, f"2:{name}", var.initial, var.variant)
            if var.writable:
                await node.set_writable()
        _lenient(server, {ua.NodeId.from_string(v.nodeid) for v in VARIABLES.values() if v.lenient})
        await server.start()
        self._server = server
        self.starts += 1

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def _cancel_leftovers(self) -> None:
        # asyncua's server leaves session timers behind when it stops
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _validate(self, cert: x509.Certificate, app: Any) -> None:
        der = cert.public_bytes(serialization.Encoding.DER)
        if self.trusted is not None and der not in self.trusted:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
