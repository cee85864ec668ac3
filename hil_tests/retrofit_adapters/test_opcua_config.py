"""The opcua device's config: node syntax (NodeId and browse path), security, endpoint and
credentials, each refused with its exact message, and the loader's paths and secrets for it."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any, Union

import pytest
from pydantic import Field, ValidationError

from gateway.config import loader as loader_module
from gateway.config.loader import LoadedConfig
from gateway.config.models import GatewayConfig
from gateway.errors import ConfigError
from retrofit_adapters.opcua.config import (
    BrowsePathRef,
    NodeIdRef,
    NodeSyntaxError,
    OpcUaDevice,
    OpcUaSecurity,
    OpcUaTag,
    parse_node,
)
from retrofit_adapters.simulated.config import SimulatedDevice

EXAMPLES = "'ns=2;s=Pump.Flow', 'ns=2;i=1001' or '/Objects/2:Plant/2:Pump1/2:Flow'"


def device(**kw: Any) -> OpcUaDevice:
    data: dict[str, Any] = {
        "id": "plc1",
        "type": "opcua",
        "endpoint": "opc.tcp://10.0.0.5:4840",
        "tags": [{"name": "flow", "node": "ns=2;s=Pump.Flow"}],
    }
    data.update(kw)
    return OpcUaDevice.model_validate(data)


def messages(exc: ValidationError) -> list[str]:
    return [e["msg"] for e in exc.errors()]


def refused(model: type[Any], data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(data)
    return messages(exc.value)


# --- node syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ns=2;s=Pump.Flow", NodeIdRef("s", "Pump.Flow", 2)),
        ("ns=2;i=1001", NodeIdRef("i", 1001, 2)),
        ("i=85", NodeIdRef("i", 85, 0)),
        ("ns=0;i=4294967295", NodeIdRef("i", 2**32 - 1, 0)),
        # a string identifier takes everything after "s=", separators included
        ("ns=3;s=Line 1;Pump=2", NodeIdRef("s", "Line 1;Pump=2", 3)),
        ("s=ns=5", NodeIdRef("s", "ns=5", 0)),
        ("nsu=urn:acme:plc;s=Flow", NodeIdRef("s", "Flow", 0, "urn:acme:plc")),
        (
            "ns=1;g=72962b91-fa75-4ae6-8d28-b404dc7daf63",
            NodeIdRef("g", uuid.UUID("72962b91-fa75-4ae6-8d28-b404dc7daf63"), 1),
        ),
        ("ns=4;b=AQID", NodeIdRef("b", b"\x01\x02\x03", 4)),
        (
            "/Objects/2:Plant/2:Pump1/2:Flow",
            BrowsePathRef(((0, "Objects"), (2, "Plant"), (2, "Pump1"), (2, "Flow"))),
        ),
        ("/Objects/Server", BrowsePathRef(((0, "Objects"), (0, "Server")))),
        # only a numeric prefix is a namespace index; the rest of the element is the name
        ("/Objects/2:A:B/Tank:1", BrowsePathRef(((0, "Objects"), (2, "A:B"), (0, "Tank:1")))),
    ],
)
def test_node_syntax_accepted(text: str, expected: object) -> None:
    assert parse_node(text) == expected
    assert OpcUaTag(name="t", node=text).node_ref() == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"must not be empty; write {EXAMPLES}"),
        (" ns=2;i=1", "must not start or end with spaces"),
        ("Pump.Flow", f"expected an identifier i=, s=, g= or b=; write {EXAMPLES}"),
        (
            "ns=2;Pump.Flow",
            f"expected an identifier i=, s=, g= or b= after 'ns=2;'; write {EXAMPLES}",
        ),
        ("ns=2", f"expected an identifier i=, s=, g= or b=; write {EXAMPLES}"),
        ("ns=2;x=5", f"expected an identifier i=, s=, g= or b= after 'ns=2;'; write {EXAMPLES}"),
        ("ns=x;i=1", "namespace index 'x' must be an integer 0..65535"),
        ("ns=65536;i=1", "namespace index '65536' must be an integer 0..65535"),
        ("ns=2;i=abc", "numeric identifier 'abc' must be an integer 0..4294967295"),
        ("ns=2;i=-1", "numeric identifier '-1' must be an integer 0..4294967295"),
        ("i=4294967296", "numeric identifier '4294967296' must be an integer 0..4294967295"),
        ("ns=2;s=", "identifier after 's=' must not be empty"),
        (
            "ns=2;g=not-a-guid",
            "GUID identifier 'not-a-guid' must look like 72962b91-fa75-4ae6-8d28-b404dc7daf63",
        ),
        ("ns=2;b=!!", "opaque identifier '!!' must be base64, e.g. b=M/RbKBsRVkePCePcx24oRA=="),
        ("nsu=;s=Flow", "namespace URI after 'nsu=' must not be empty"),
        ("/", "browse path element 1 is empty (in '/')"),
        ("/Objects//Flow", "browse path element 2 is empty (in '/Objects//Flow')"),
        ("/Objects/2:Plant/", "browse path element 3 is empty (in '/Objects/2:Plant/')"),
        ("/Objects/2:", "browse path element '2:' has no name after the ':'"),
        ("/Objects/70000:X", "browse path element '70000:X': namespace index must be 0..65535"),
    ],
)
def test_node_syntax_refused(text: str, message: str) -> None:
    with pytest.raises(NodeSyntaxError) as exc:
        parse_node(text)
    assert str(exc.value) == message
    assert refused(OpcUaTag, {"name": "t", "node": text}) == [message]


def test_a_message_may_contain_braces() -> None:
    # pydantic formats custom messages; the node text is passed as context, not as template
    assert refused(OpcUaTag, {"name": "t", "node": "ns={x};i=1"}) == [
        "namespace index '{x}' must be an integer 0..65535"
    ]


# --- tags --------------------------------------------------------------------------------


def test_tag_defaults() -> None:
    tag = OpcUaTag(name="flow", node="ns=2;s=Pump.Flow")
    assert (tag.sampling_interval_ms, tag.server_deadband, tag.writable) == (None, None, False)
    assert (tag.min, tag.max, tag.forward) == (None, None, "summary")
    dev = device(
        period_ms=250,
        tags=[
            {"name": "a", "node": "i=1"},
            {"name": "b", "node": "i=2", "sampling_interval_ms": 0},
        ],
    )
    assert [dev.sampling_interval_ms(t) for t in dev.tags] == [250, 0]


def test_write_limits() -> None:
    tag = OpcUaTag(name="sp", node="i=5", writable=True, min=0, max=100)
    assert (tag.min, tag.max) == (0.0, 100.0)
    assert refused(OpcUaTag, {"name": "sp", "node": "i=5", "min": 0}) == [
        "`min` and `max` limit writes; set `writable = true` or remove them"
    ]
    assert refused(
        OpcUaTag, {"name": "sp", "node": "i=5", "writable": True, "min": 5, "max": 1}
    ) == ["`min` must not be greater than `max`"]
    assert refused(OpcUaTag, {"name": "sp", "node": "i=5", "server_deadband": -1}) == [
        "must be 0 or more"
    ]


# --- security ----------------------------------------------------------------------------


def test_security_defaults_to_none() -> None:
    sec = OpcUaSecurity()
    assert (sec.policy, sec.mode) == ("None", "None")
    ok = OpcUaSecurity(
        policy="Basic256Sha256",
        mode="SignAndEncrypt",
        certificate_file="c.der",
        private_key_file="k.pem",
    )
    assert ok.server_certificate_file is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"mode": "Sign"},
            "mode 'Sign' needs a security policy; set policy = 'Basic256Sha256' (or mode = 'None')",
        ),
        (
            {"mode": "SignAndEncrypt"},
            "mode 'SignAndEncrypt' needs a security policy; set policy = 'Basic256Sha256' "
            "(or mode = 'None')",
        ),
        (
            {"policy": "Basic256Sha256", "certificate_file": "c", "private_key_file": "k"},
            "policy 'Basic256Sha256' needs mode 'Sign' or 'SignAndEncrypt'",
        ),
        (
            {"policy": "Basic256Sha256", "mode": "Sign"},
            "policy 'Basic256Sha256' needs `certificate_file` and `private_key_file` "
            "(the client's certificate and private key)",
        ),
        (
            {"policy": "Basic256Sha256", "mode": "Sign", "certificate_file": "c"},
            "policy 'Basic256Sha256' needs `private_key_file` (the client's certificate and "
            "private key)",
        ),
        (
            {"certificate_file": "c", "server_certificate_file": "s"},
            "`certificate_file`, `server_certificate_file` apply only with policy 'Basic256Sha256'",
        ),
    ],
)
def test_security_refused(data: dict[str, Any], message: str) -> None:
    assert refused(OpcUaSecurity, data) == [message]


def test_weak_policies_are_not_offered() -> None:
    # ThingsBoard's default; deprecated by the OPC Foundation
    for policy in ("Basic128Rsa15", "Basic256"):
        with pytest.raises(ValidationError):
            OpcUaSecurity.model_validate({"policy": policy, "mode": "Sign"})


# --- device ------------------------------------------------------------------------------


def test_device_defaults() -> None:
    dev = device()
    assert (dev.mode, dev.publishing_interval_ms, dev.keepalive_s) == ("subscribe", 500.0, 10.0)
    assert (dev.username, dev.password, dev.security) == (None, None, OpcUaSecurity())
    assert dev.tags[0].node_ref() == NodeIdRef("s", "Pump.Flow", 2)


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("http://10.0.0.5:4840", "must be an opc.tcp:// URL, e.g. opc.tcp://192.168.1.10:4840"),
        ("10.0.0.5:4840", "must be an opc.tcp:// URL, e.g. opc.tcp://192.168.1.10:4840"),
        ("opc.tcp://:4840", "needs a host: opc.tcp://host:port"),
        ("opc.tcp://plc", "needs a port, e.g. opc.tcp://plc:4840"),
        ("opc.tcp://plc:99999", "bad port: Port out of range 0-65535"),
        (
            "opc.tcp://op:secret@plc:4840",
            "no user name or password in the endpoint; use `username` and "
            "`password = { file = ... }` or `{ env = ... }`",
        ),
    ],
)
def test_endpoint_refused(endpoint: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        device(endpoint=endpoint)
    assert messages(exc.value) == [message]


def test_endpoint_with_path() -> None:
    assert device(endpoint="opc.tcp://plc-7.local:48010/UA/Server").endpoint.endswith("/UA/Server")


def test_device_refusals() -> None:
    with pytest.raises(ValidationError) as exc:
        device(tags=[])
    assert messages(exc.value) == ["give at least one tag"]
    with pytest.raises(ValidationError) as exc:
        device(password={"env": "PLC_PW"})
    assert messages(exc.value) == ["`password` needs `username`"]
    with pytest.raises(ValidationError) as exc:
        device(mode="push")
    assert len(exc.value.errors()) == 1
    with pytest.raises(ValidationError) as exc:
        device(keepalive_s=0)
    assert messages(exc.value) == ["must be greater than 0"]


# --- through the loader ------------------------------------------------------------------

HEAD = '[gateway]\nid = "gw1"\nsite = "plant-a"\n'
PLC = (
    '[[devices]]\nid = "plc1"\ntype = "opcua"\nendpoint = "opc.tcp://10.0.0.5:4840"\n'
    'username = "gateway"\npassword = { env = "PLC_PW" }\n'
    '[devices.security]\npolicy = "Basic256Sha256"\nmode = "SignAndEncrypt"\n'
    'certificate_file = "pki/gw.der"\nprivate_key_file = "pki/gw.pem"\n'
    '[[devices.tags]]\nname = "flow"\nnode = "ns=2;s=Pump.Flow"\n'
    '[[devices.tags]]\nname = "sp"\nnode = "/Objects/2:Plant/2:Setpoint"\nwritable = true\n'
    "min = 0\nmax = 100\n"
)


class OpcUaConfig(GatewayConfig):
    # Simulated and opcua devices only, whatever else the gateway's own union holds.
    devices: list[
        Annotated[Union[SimulatedDevice, OpcUaDevice], Field(discriminator="type")]  # noqa: UP007
    ] = []  # type: ignore[assignment]


def load(text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return loader_module._parse(
        text, source="<test>", base_dir=Path.cwd(), path=None, env=env or {}, model=OpcUaConfig
    )


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(text, env)
    return [str(p) for p in exc.value.problems]


def test_loader_resolves_the_password() -> None:
    loaded = load(HEAD + PLC, {"PLC_PW": "s3cret"})
    (dev,) = loaded.config.devices
    assert isinstance(dev, OpcUaDevice)
    assert dev.security.mode == "SignAndEncrypt"
    # what the runtime passes to OpcUaAdapter(cfg, password=...)
    assert loaded.secret("devices[0].password") == "s3cret"
    assert "s3cret" not in repr(loaded)


def test_loader_reports_with_dotted_paths() -> None:
    text = HEAD + PLC.replace("ns=2;s=Pump.Flow", "ns=2;q=Pump.Flow").replace(
        'mode = "SignAndEncrypt"', 'mode = "None"'
    )
    assert problems(text, {"PLC_PW": "x"}) == [
        "devices[0].security: policy 'Basic256Sha256' needs mode 'Sign' or 'SignAndEncrypt'",
        "devices[0].tags[0].node: expected an identifier i=, s=, g= or b= after 'ns=2;'; "
        f"write {EXAMPLES}",
    ]


def test_loader_refuses_an_inline_password_and_a_missing_secret() -> None:
    text = HEAD + PLC.replace('password = { env = "PLC_PW" }', 'password = "s3cret"')
    found = problems(text)
    assert found == [
        "devices[0].password: inline secrets are not allowed; "
        'use { file = "..." } or { env = "..." }'
    ]
    assert "s3cret" not in " ".join(found)
    assert problems(HEAD + PLC) == [
        "devices[0].password.env: environment variable PLC_PW is not set"
    ]


def test_loader_reports_duplicate_tags() -> None:
    text = HEAD + PLC + '[[devices.tags]]\nname = "flow"\nnode = "i=2258"\n'
    assert problems(text, {"PLC_PW": "x"}) == [
        "devices[0].tags[2].name: duplicate tag name 'flow' (also devices[0].tags[0])"
    ]


def test_config_does_not_import_asyncua() -> None:
    # gateway.config imports the config module through the package; asyncua loads with the adapter
    code = (
        "import sys, retrofit_adapters.opcua, retrofit_adapters.opcua.config\n"
        "assert 'asyncua' not in sys.modules, 'asyncua imported'\n"
        "import retrofit_adapters.opcua.adapter\n"
        "assert 'asyncua' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
