"""The config loader as an integrator meets it: exact messages with dotted paths, secrets, schema."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast

import jsonschema  # type: ignore[import-untyped]
import pytest
from pydantic import Field

import gateway.config
from gateway.config import LoadedConfig, config_json_schema, load_config, parse_config
from gateway.config import loader as loader_module
from gateway.config.fragments import DeviceBase, SecretRef, SupervisorConfig, TagBase
from gateway.config.models import (
    DEVICE_TYPES,
    EdgeSection,
    GatewayConfig,
    GatewaySection,
    HttpSection,
    HttpToken,
    MqttOptions,
    QueueConfig,
    RuleConfig,
    TlsConfig,
    UplinkSection,
)
from gateway.errors import ConfigError
from retrofit_adapters.simulated.config import FaultConfig, SimulatedDevice, SimulatedTag

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tools" / "configs" / "example.toml"
CONFIGS = Path(__file__).parent / "configs"

HEAD = """
[gateway]
id = "gw1"
site = "plant-a"
"""
PUMP = """
[[devices]]
id = "p1"
type = "simulated"
"""
SIGNALS = "flow_m3h, pressure_bar, temperature_c, vibration_mm_s"


def simulated(cfg: GatewayConfig) -> list[SimulatedDevice]:
    # The device union is opaque to mypy; every device in these configs is simulated.
    assert all(isinstance(d, SimulatedDevice) for d in cfg.devices)
    return cast(list[SimulatedDevice], cfg.devices)


def problems(text: str, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, **kw)
    return [str(p) for p in exc.value.problems]


# --- good configs --------------------------------------------------------------------------


def test_example_config_loads_and_shows_every_feature() -> None:
    loaded = load_config(EXAMPLE, env={})
    cfg = loaded.config
    assert loaded.path == EXAMPLE
    assert loaded.base_dir == EXAMPLE.parent
    assert cfg.uplink.url == "sqlite:///var/fog.db"
    devices = simulated(cfg)
    assert [d.id for d in devices] == ["pump1", "pump2"]
    pump1 = devices[0]
    temperature = next(t for t in pump1.tags if t.name == "temperature_c")
    assert (temperature.forward, temperature.deadband, temperature.heartbeat_s) == (
        "raw",
        0.5,
        300.0,
    )
    assert [f.kind for f in pump1.faults] == ["spike"]
    assert {r.name: (r.below, r.above) for r in cfg.rules} == {
        "pump1-vibration-high": (None, 4.5),
        "pump2-pressure-low": (3.2, None),
        "pump2-temperature-band": (10.0, 70.0),
    }


def test_example_mqtt_alternative_is_valid_once_uncommented() -> None:
    text = EXAMPLE.read_text()
    keys = (
        'url = "mqtts|\\[uplink\\.mqtt\\]|version|client_id|username|password|keepalive_s|inflight'
    )
    uncommented = re.sub(rf"(?m)^# ?(?=({keys}))", "", text)
    uncommented = uncommented.replace('url = "sqlite:///var/fog.db"\n', "", 1)
    loaded = parse_config(uncommented, env={"FOGMESH_MQTT_PASSWORD": "pw"})
    assert loaded.config.uplink.url.startswith("mqtts://")
    assert loaded.config.uplink.mqtt.version == "5"
    assert loaded.secret("uplink.mqtt.password") == "pw"


def test_minimal_config_loads_with_defaults() -> None:
    loaded = load_config(CONFIGS / "minimal.toml", env={})
    cfg = loaded.config
    assert (cfg.gateway.id, cfg.gateway.site, cfg.gateway.data_dir) == ("gw1", "plant-a", "var")
    (dev,) = simulated(cfg)
    assert (dev.period_ms, dev.tag_names()) == (100, SIGNALS.split(", "))
    assert cfg.rules == []
    assert loaded.secrets == {}


def test_demo_config_still_loads() -> None:
    loaded = load_config(ROOT / "tools" / "configs" / "demo.toml", env={})
    types = {d.id: d.type for d in loaded.config.devices}
    assert types == {
        "pump1": "modbus_tcp",
        "pump2": "opcua",
        "pump3": "modbus_tcp",
        "pump4": "opcua",
        "meter": "modbus_tcp",
    }


# --- bad configs: one exact message each ---------------------------------------------------

BAD: list[tuple[str, str, list[str]]] = [
    ("empty file", "", ["gateway: required"]),
    ("missing key", '[gateway]\nid = "gw1"\n', ["gateway.site: required"]),
    (
        "unknown section",
        HEAD + "[edges]\nwindow_s = 1\n",
        [
            "edges: unknown key 'edges'; expected one of: gateway, http, uplink, edge, devices, rules, models"
        ],
    ),
    (
        "bad name",
        '[gateway]\nid = "gw 1"\nsite = "a"\n',
        [
            "gateway.id: must be 1-64 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit"
        ],
    ),
    (
        "string for integer",
        HEAD + '[http]\nport = "8080"\n',
        ["http.port: must be an integer (got string '8080')"],
    ),
    ("integer range", HEAD + "[http]\nport = 70000\n", ["http.port: must be 0..65535"]),
    (
        "boolean",
        HEAD + '[http]\nenabled = "yes"\n',
        ["http.enabled: must be a boolean (got string 'yes')"],
    ),
    (
        "integer for string",
        HEAD + "[http]\nhost = 5\n",
        ["http.host: must be a string (got integer 5)"],
    ),
    ("zero", HEAD + "[edge]\nwindow_s = 0\n", ["edge.window_s: must be greater than 0"]),
    (
        "nan",
        HEAD + "[edge]\nwindow_s = nan\n",
        ["edge.window_s: must be a finite number (got float nan)"],
    ),
    (
        "boolean for number",
        HEAD + "[edge]\nwindow_s = true\n",
        ["edge.window_s: must be a number (got boolean true)"],
    ),
    (
        "url scheme",
        HEAD + '[uplink]\nurl = "http://fog:80"\n',
        [
            "uplink.url: scheme must be one of mqtt, mqtts, sqlite, e.g. mqtt://127.0.0.1:1883 or sqlite:///var/fog.db"
        ],
    ),
    (
        "sqlite host",
        HEAD + '[uplink]\nurl = "sqlite://var/fog.db"\n',
        ["uplink.url: sqlite URL needs a path: sqlite:///relative or sqlite:////absolute"],
    ),
    (
        "date for string",
        HEAD + "[uplink]\nurl = 1979-05-27\n",
        ["uplink.url: must be a string (got date 1979-05-27)"],
    ),
    (
        "literal",
        HEAD + '[uplink.queue]\nfull_policy = "block"\n',
        ["uplink.queue.full_policy: must be one of 'drop_oldest', 'reject_new'"],
    ),
    (
        "literal of number",
        HEAD + "[uplink.mqtt]\nversion = 5\n",
        ["uplink.mqtt.version: must be one of '3.1.1', '5'"],
    ),
    (
        "float for integer",
        HEAD + "[uplink.mqtt]\nkeepalive_s = 1.5\n",
        ["uplink.mqtt.keepalive_s: must be an integer (got float 1.5)"],
    ),
    (
        "model validator",
        HEAD + '[uplink.mqtt.tls]\ncert_file = "gw.pem"\n',
        ["uplink.mqtt.tls: give both `cert_file` and `key_file`, or neither"],
    ),
    (
        "secret with two sources",
        HEAD + '[uplink.mqtt]\npassword = { file = "pw", env = "PW" }\n',
        ["uplink.mqtt.password: give exactly one of `file` or `env`"],
    ),
    (
        "secret with no source",
        HEAD + "[uplink.mqtt]\npassword = {}\n",
        ["uplink.mqtt.password: give exactly one of `file` or `env`"],
    ),
    (
        "devices as a table",
        HEAD + '[devices]\nid = "p1"\n',
        ["devices: must be an array of tables: write [[devices]], not [devices]"],
    ),
    (
        "device type missing",
        HEAD + '[[devices]]\nid = "p1"\n',
        ["devices[0].type: required; one of: simulated, modbus_tcp, modbus_rtu, opcua, mesh"],
    ),
    (
        "device type unknown",
        HEAD + '[[devices]]\nid = "p1"\ntype = "modbus"\nhost = "10.0.0.5"\n',
        [
            "devices[0].type: unknown device type 'modbus'; expected one of: simulated, modbus_tcp, modbus_rtu, opcua, mesh"
        ],
    ),
    (
        "device type not a string",
        HEAD + "[[devices]]\ntype = 5\n",
        [
            "devices[0].type: must be one of: simulated, modbus_tcp, modbus_rtu, opcua, mesh (got integer 5)"
        ],
    ),
    (
        "device not a table",
        'devices = ["p1"]\n' + HEAD,
        ["devices[0]: must be a table (got string 'p1')"],
    ),
    (
        "device key typo",
        HEAD + PUMP + "perod_ms = 100\n",
        [
            "devices[0].perod_ms: unknown key 'perod_ms'; expected one of: "
            "id, enabled, period_ms, timeout_ms, supervisor, type, model, seed, tags, faults"
        ],
    ),
    (
        "negative",
        HEAD + PUMP + "period_ms = -5\n",
        ["devices[0].period_ms: must be greater than 0"],
    ),
    (
        "float for ms",
        HEAD + PUMP + "period_ms = 100.0\n",
        ["devices[0].period_ms: must be an integer (got float 100.0)"],
    ),
    (
        "supervisor bound",
        HEAD + PUMP + "[devices.supervisor]\njitter = 2\n",
        ["devices[0].supervisor.jitter: must be 1 or less"],
    ),
    ("device model", HEAD + PUMP + 'model = "fan"\n', ["devices[0].model: must be one of 'pump'"]),
    (
        "two deadbands",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\ndeadband = 1\ndeadband_percent = 5\n',
        ["devices[0].tags[0]: give `deadband` or `deadband_percent`, not both"],
    ),
    (
        "percent",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\ndeadband_percent = 200\n',
        ["devices[0].tags[0].deadband_percent: must be 100 or less"],
    ),
    (
        "tag name missing",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\n[[devices.tags]]\nunit = "bar"\n',
        ["devices[0].tags[1].name: required"],
    ),
    (
        "forward",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\nforward = "all"\n',
        ["devices[0].tags[0].forward: must be one of 'summary', 'raw', 'none'"],
    ),
    (
        "fault needs a tag",
        HEAD + PUMP + '[[devices.faults]]\nkind = "spike"\nat_s = 1\nduration_s = 1\n',
        ["devices[0].faults[0]: fault `spike` needs a `tag`"],
    ),
    (
        "fault takes no tag",
        HEAD
        + PUMP
        + '[[devices.faults]]\nkind = "hang"\ntag = "flow_m3h"\nat_s = 1\nduration_s = 1\n',
        ["devices[0].faults[0]: fault `hang` applies to the whole device; remove `tag`"],
    ),
    (
        "fault kind",
        HEAD + PUMP + '[[devices.faults]]\nkind = "melt"\nat_s = -1\nduration_s = 1\n',
        [
            "devices[0].faults[0].kind: must be one of "
            "'spike', 'drift', 'stuck', 'raise', 'hang', 'garbage', 'disconnect'",
            "devices[0].faults[0].at_s: must be 0 or more",
        ],
    ),
    (
        "rule without limit",
        HEAD + PUMP + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\n',
        ["rules[0]: give `above`, `below`, or both"],
    ),
    (
        "rule band",
        HEAD
        + PUMP
        + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 1\nbelow = 2\n',
        ["rules[0]: `below` must be less than `above` (an alarm band outside below..above)"],
    ),
    (
        "rule fields",
        HEAD
        + PUMP
        + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 1\nseverity = "fatal"\nfor_ms = -1\n',
        [
            "rules[0].for_ms: must be 0..86400000",
            "rules[0].severity: must be one of 'info', 'warning', 'critical'",
        ],
    ),
    ("rule not a table", "rules = [1]\n" + HEAD, ["rules[0]: must be a table (got integer 1)"]),
    # second pass: references between sections
    (
        "duplicate device",
        HEAD + PUMP + PUMP + '[[devices]]\nid = "p2"\ntype = "simulated"\n' + PUMP,
        [
            "devices[1].id: duplicate device id 'p1' (also devices[0])",
            "devices[3].id: duplicate device id 'p1' (also devices[0])",
        ],
    ),
    (
        "duplicate tag",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\n[[devices.tags]]\nname = "flow_m3h"\n',
        ["devices[0].tags[1].name: duplicate tag name 'flow_m3h' (also devices[0].tags[0])"],
    ),
    (
        "tag not a signal",
        HEAD + PUMP + '[[devices.tags]]\nname = "rpm"\n',
        [f"devices[0].tags[0].name: model 'pump' has no signal 'rpm'; signals are: {SIGNALS}"],
    ),
    (
        "fault on a tag the device lacks",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\n'
        '[[devices.faults]]\nkind = "stuck"\ntag = "pressure_bar"\nat_s = 1\nduration_s = 1\n',
        ["devices[0].faults[0].tag: device 'p1' has no tag 'pressure_bar'; tags are: flow_m3h"],
    ),
    (
        "rule on a missing device",
        HEAD + PUMP + '[[devices]]\nid = "p2"\ntype = "simulated"\n'
        '[[rules]]\nname = "r"\ndevice = "p9"\ntag = "flow_m3h"\nabove = 1\n',
        ["rules[0].device: no device 'p9'; devices are: p1, p2"],
    ),
    (
        "rule with no devices at all",
        HEAD + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 1\n',
        ["rules[0].device: no device 'p1'; no devices are configured"],
    ),
    (
        "rule on a default tag set",
        HEAD + PUMP + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "rpm"\nabove = 1\n',
        [f"rules[0].tag: device 'p1' has no tag 'rpm'; tags are: {SIGNALS}"],
    ),
    (
        "rule on an explicit tag set",
        HEAD + PUMP + '[[devices.tags]]\nname = "flow_m3h"\n'
        '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "pressure_bar"\nabove = 1\n',
        ["rules[0].tag: device 'p1' has no tag 'pressure_bar'; tags are: flow_m3h"],
    ),
    (
        "rule on a disabled device",
        HEAD
        + PUMP
        + "enabled = false\n"
        + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 1\n',
        ["rules[0].device: device 'p1' is disabled; enable it or remove the rule"],
    ),
    (
        "duplicate rule",
        HEAD + PUMP + '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "flow_m3h"\nabove = 1\n'
        '[[rules]]\nname = "r"\ndevice = "p1"\ntag = "pressure_bar"\nbelow = 1\n',
        ["rules[1].name: duplicate rule name 'r' (also rules[0])"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in BAD], ids=[n for n, _, _ in BAD]
)
def test_bad_config_reports_exact_problems(text: str, expected: list[str]) -> None:
    assert problems(text, env={}) == expected


def test_every_problem_is_reported_together_in_file_order() -> None:
    path = CONFIGS / "many-problems.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    expected = [
        "gateway.id: must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter or digit",
        "http.port: must be an integer (got string '8080')",
        'uplink.mqtt.password: inline secrets are not allowed; use { file = "..." } or { env = "..." }',
        "devices[0].type: unknown device type 'modbus'; expected one of: simulated, modbus_tcp, modbus_rtu, opcua, mesh",
        "devices[1].perod_ms: unknown key 'perod_ms'; expected one of: "
        "id, enabled, period_ms, timeout_ms, supervisor, type, model, seed, tags, faults",
        "rules[0]: give `above`, `below`, or both",
    ]
    assert [str(p) for p in exc.value.problems] == expected
    assert exc.value.source == str(path)
    assert str(exc.value) == f"{path}: " + "; ".join(expected)


def test_references_are_checked_only_once_the_structure_is_valid() -> None:
    # The rule names a missing device, but with a broken device the device list is not known.
    text = (
        HEAD
        + PUMP
        + "period_ms = 0\n"
        + '[[rules]]\nname = "r"\ndevice = "p9"\ntag = "x"\nabove = 1\n'
    )
    assert problems(text) == ["devices[0].period_ms: must be greater than 0"]


def test_missing_config_file() -> None:
    path = CONFIGS / "no-such.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert [str(p) for p in exc.value.problems] == ["cannot read file: No such file or directory"]
    assert str(exc.value) == f"{path}: cannot read file: No such file or directory"


def test_config_file_with_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + PUMP).encode())
    assert load_config(path).config.gateway.id == "gw1"


# --- TOML syntax ---------------------------------------------------------------------------

SYNTAX = [
    ("missing value", "[gateway]\nid =\n", "TOML syntax error at line 2, column 5: invalid value"),
    (
        "string not closed",
        '[gateway]\nid = "gw1\n',
        "TOML syntax error at line 2, column 10: unexpected end of line (a string not closed?)",
    ),
    (
        "table twice",
        "[gateway]\n[http]\n[gateway]\n",
        "TOML syntax error at line 3, column 9: cannot declare [gateway] twice",
    ),
    (
        "dotted table twice",
        "[uplink.mqtt]\n[uplink.mqtt]\n",
        "TOML syntax error at line 2, column 13: cannot declare [uplink.mqtt] twice",
    ),
    (
        "end of document",
        "[gateway]\nsite = [1,\n  2,",
        "TOML syntax error at line 3, column 5: invalid value",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in SYNTAX], ids=[n for n, _, _ in SYNTAX]
)
def test_toml_syntax_error_is_one_problem_with_line_and_column(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source="gw.toml")
    assert [str(p) for p in exc.value.problems] == [expected]
    assert str(exc.value) == f"gw.toml: {expected}"
    assert isinstance(exc.value.__cause__, tomllib.TOMLDecodeError)


# --- secrets -------------------------------------------------------------------------------

MQTT = HEAD + '[uplink]\nurl = "mqtt://127.0.0.1:1883"\n[uplink.mqtt]\nusername = "gw1"\n'


def test_secret_from_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "mqtt").write_text("s3cret-from-file\n")
    path = tmp_path / "gw.toml"
    path.write_text(MQTT + 'password = { file = "secrets/mqtt" }\n')
    loaded = load_config(path, env={})
    assert loaded.secret("uplink.mqtt.password") == "s3cret-from-file"  # newline stripped
    assert dict(loaded.secrets) == {"uplink.mqtt.password": "s3cret-from-file"}
    assert loaded.secret("uplink.mqtt.username") is None


def test_secret_from_env() -> None:
    text = MQTT + 'password = { env = "FOGMESH_MQTT_PASSWORD" }\n'
    loaded = parse_config(text, env={"FOGMESH_MQTT_PASSWORD": "s3cret-from-env"})
    assert loaded.secret("uplink.mqtt.password") == "s3cret-from-env"


def test_secret_from_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGMESH_TEST_PW", "from-os-environ")
    loaded = parse_config(MQTT + 'password = { env = "FOGMESH_TEST_PW" }\n')
    assert loaded.secret("uplink.mqtt.password") == "from-os-environ"


SECRET_PROBLEMS = [
    (
        "missing file",
        'password = { file = "nope.txt" }\n',
        "uplink.mqtt.password.file: cannot read '{base}/nope.txt': No such file or directory",
    ),
    (
        "directory",
        'password = { file = "." }\n',
        "uplink.mqtt.password.file: cannot read '{base}': Is a directory",
    ),
    (
        "empty file",
        'password = { file = "empty.txt" }\n',
        "uplink.mqtt.password.file: secret file '{base}/empty.txt' is empty",
    ),
    (
        "unset env",
        'password = { env = "FOGMESH_UNSET" }\n',
        "uplink.mqtt.password.env: environment variable FOGMESH_UNSET is not set",
    ),
    (
        "empty env",
        'password = { env = "FOGMESH_EMPTY" }\n',
        "uplink.mqtt.password.env: environment variable FOGMESH_EMPTY is empty",
    ),
    (
        "inline string",
        'password = "hunter2-inline"\n',
        'uplink.mqtt.password: inline secrets are not allowed; use { file = "..." } or { env = "..." }',
    ),
    (
        "inline integer",
        "password = 123456789\n",
        'uplink.mqtt.password: inline secrets are not allowed; use { file = "..." } or { env = "..." }',
    ),
    (
        "value inside the reference",
        'password = { value = "hunter2-inline" }\n',
        "uplink.mqtt.password.value: unknown key 'value'; expected one of: file, env",
    ),
    (
        "wrong type inside the reference",
        "password = { env = 123456789 }\n",
        "uplink.mqtt.password.env: must be a string (got integer)",
    ),
]


@pytest.mark.parametrize(
    ("line", "expected"),
    [(t, e) for _, t, e in SECRET_PROBLEMS],
    ids=[n for n, _, _ in SECRET_PROBLEMS],
)
def test_secret_problems(tmp_path: Path, line: str, expected: str) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    got = problems(MQTT + line, base_dir=tmp_path, env={"FOGMESH_EMPTY": ""})
    assert got == [expected.replace("{base}", str(tmp_path))]


def test_secret_problems_are_reported_with_structural_ones(tmp_path: Path) -> None:
    text = MQTT + 'password = { env = "FOGMESH_UNSET" }\n' + PUMP + "period_ms = 0\n"
    assert problems(text, env={}) == [
        "uplink.mqtt.password.env: environment variable FOGMESH_UNSET is not set",
        "devices[0].period_ms: must be greater than 0",
    ]


def test_no_secret_leaks_into_errors_or_reprs(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-from-file")
    loaded = parse_config(MQTT + 'password = { file = "pw" }\n', base_dir=tmp_path)
    assert "s3cret-from-file" not in repr(loaded)
    assert "s3cret-from-file" not in str(loaded)

    leaky = [
        MQTT + 'password = "hunter2-inline"\n',
        MQTT + 'password = { value = "hunter2-inline" }\n',
        MQTT + 'password = { file = "pw", env = "hunter2-inline" }\n',
        HEAD + '[uplink]\nurl = "mqtt://gw1:hunter2-inline@fog:1883"\n',
    ]
    for text in leaky:
        with pytest.raises(ConfigError) as exc:
            parse_config(text, base_dir=tmp_path, env={})
        err = exc.value
        assert "hunter2" not in str(err) + repr(err) + repr(err.problems), text
        # pydantic's error carries the input; it must not ride along as the cause
        assert err.__cause__ is None and err.__context__ is None


def test_loaded_config_secrets_cannot_be_changed() -> None:
    loaded = parse_config(MQTT + 'password = { env = "PW" }\n', env={"PW": "x"})
    with pytest.raises(TypeError):
        loaded.secrets["uplink.mqtt.password"] = "y"  # type: ignore[index]


# --- paths ---------------------------------------------------------------------------------


def test_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "gw.toml"
    path.parent.mkdir()
    path.write_text(HEAD + PUMP)
    loaded = load_config(path)
    assert loaded.base_dir == tmp_path / "etc"
    assert loaded.resolve_path("certs/ca.pem") == tmp_path / "etc" / "certs" / "ca.pem"
    assert loaded.resolve_path("/etc/ssl/ca.pem") == Path("/etc/ssl/ca.pem")
    assert loaded.data_dir == tmp_path / "etc" / "var"
    assert loaded.queue_path == tmp_path / "etc" / "var" / "queue.db"
    assert loaded.sink_url == f"sqlite:///{tmp_path}/etc/var/fog.db"


@pytest.mark.parametrize(
    ("extra", "queue", "data_dir"),
    [
        ('[uplink.queue]\npath = "spool/q.db"\n', "{base}/spool/q.db", "{base}/var"),
        ('[uplink.queue]\npath = "/srv/q.db"\n', "/srv/q.db", "{base}/var"),
        ('data_dir = "/data/fog"\n', "/data/fog/queue.db", "/data/fog"),
        ('data_dir = "state"\n', "{base}/state/queue.db", "{base}/state"),
    ],
)
def test_queue_path_and_data_dir(tmp_path: Path, extra: str, queue: str, data_dir: str) -> None:
    # HEAD ends inside [gateway], so a data_dir line lands there
    loaded = parse_config(HEAD + extra, base_dir=tmp_path)
    assert loaded.queue_path == Path(queue.format(base=tmp_path))
    assert loaded.data_dir == Path(data_dir.format(base=tmp_path))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/fog.db", "sqlite:///{base}/var/fog.db"),
        ("sqlite:///fog.db?mode=rwc", "sqlite:///{base}/fog.db?mode=rwc"),
        ("sqlite:////srv/fog.db", "sqlite:////srv/fog.db"),
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("mqtts://fog.example:8883", "mqtts://fog.example:8883"),
    ],
)
def test_sink_url(tmp_path: Path, url: str, expected: str) -> None:
    loaded = parse_config(HEAD + f'[uplink]\nurl = "{url}"\n', base_dir=tmp_path)
    assert loaded.sink_url == expected.format(base=tmp_path)


def test_parse_config_defaults_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = parse_config(HEAD)
    assert (loaded.path, loaded.base_dir) == (None, tmp_path)
    assert loaded.sink_url == f"sqlite:///{tmp_path}/var/fog.db"


# --- JSON schema ---------------------------------------------------------------------------


def test_json_schema_is_valid_draft_2020_12_and_accepts_the_shipped_configs() -> None:
    schema = config_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "urn:fogmesh:schema:gateway-config:1"
    assert schema["title"] == "fogmesh gateway config"
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in ("example.toml", "demo.toml"):
        validator.validate(tomllib.loads((ROOT / "tools" / "configs" / name).read_text()))


@pytest.mark.parametrize(
    "data",
    [
        {"gateway": {"id": "gw1", "site": "a", "colour": "red"}},  # unknown key
        {"gateway": {"id": "gw 1", "site": "a"}},  # name pattern
        {"gateway": {"id": "gw1", "site": "a"}, "http": {"port": 70000}},  # int_range
        {"gateway": {"id": "gw1", "site": "a"}, "edge": {"window_s": 0}},  # positive
        {"gateway": {"id": "gw1", "site": "a"}, "devices": [{"id": "p1", "type": "modbus"}]},
        {"gateway": {"id": "gw1", "site": "a"}, "uplink": {"mqtt": {"password": "inline"}}},
    ],
)
def test_json_schema_rejects_what_the_loader_rejects(data: dict[str, Any]) -> None:
    errors = list(jsonschema.Draft202012Validator(config_json_schema()).iter_errors(data))
    assert errors


def test_json_schema_uses_only_json_schema_keywords() -> None:
    # pydantic writes its own constraint names (gt, ge) for constraints behind a validator
    text = repr(config_json_schema())
    assert not re.search(r"'(gt|ge|lt|le)':", text)


# --- bearer tokens of [http] -----------------------------------------------------------------

LONG = "t" * 16


def test_http_tokens_from_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "alice").write_text("alice-" + LONG + "\n")
    loaded = parse_config(
        HEAD
        + '[http]\ntoken = { env = "OP" }\n'
        + '[[http.tokens]]\nname = "alice"\ntoken = { file = "alice" }\n'
        + '[[http.tokens]]\nname = "bob"\ntoken = { env = "BOB" }\n',
        base_dir=tmp_path,
        env={"OP": "op-" + LONG, "BOB": "bob-" + LONG},
    )
    assert loaded.http_tokens() == [
        ("operator", "op-" + LONG),
        ("alice", "alice-" + LONG),
        ("bob", "bob-" + LONG),
    ]
    assert loaded.secret("http.tokens[0].token") == "alice-" + LONG
    assert LONG not in repr(loaded)
    assert parse_config(HEAD).http_tokens() == []


def test_http_token_problems() -> None:
    env = {"A": LONG, "B": LONG, "SHORT": "abc", "OK": "x" * 16}
    text = (
        HEAD
        + '[http]\ntoken = "inline-secret-value"\n'
        + '[[http.tokens]]\nname = "alice"\ntoken = { env = "A" }\n'
        + '[[http.tokens]]\nname = "alice"\ntoken = { env = "B" }\n'
        + '[[http.tokens]]\nname = "carol"\ntoken = { env = "SHORT" }\n'
        + '[[http.tokens]]\nname = "dave"\ntoken = { env = "MISSING" }\n'
        + '[[http.tokens]]\nname = "operator"\ntoken = { env = "OK" }\n'
    )
    found = problems(text, env=env)
    assert found == [
        'http.token: inline secrets are not allowed; use { file = "..." } or { env = "..." }',
        "http.tokens[3].token.env: environment variable MISSING is not set",
    ]
    found = problems(text.replace('"inline-secret-value"', '{ env = "OP" }'), env=env)
    assert found == [
        "http.token.env: environment variable OP is not set",
        "http.tokens[3].token.env: environment variable MISSING is not set",
        "http.tokens[1].name: duplicate token name 'alice' (also http.tokens[0].name)",
        "http.tokens[1].token: the same token as http.tokens[0].token; give each its own",
        "http.tokens[2].token: token too short (3 characters); use at least 16, "
        "e.g. the output of `openssl rand -hex 32`",
        "http.tokens[4].name: duplicate token name 'operator' (also http.token)",
    ]
    found = problems(
        text.replace('"inline-secret-value"', '{ env = "OK2" }'), env={**env, "OK2": "y" * 16}
    )
    assert "http.tokens[4].name: duplicate token name 'operator' (also http.token)" in found
    assert not any(LONG in p or "abc" in p for p in found)


# --- more than one device type ------------------------------------------------------------


class FakeModbusDevice(DeviceBase):
    type: Literal["modbus"]
    host: str
    password: SecretRef | None = None
    tags: list[TagBase] = []


class TwoTypeConfig(GatewayConfig):
    devices: list[
        Annotated[Union[SimulatedDevice, FakeModbusDevice], Field(discriminator="type")]  # noqa: UP007
    ] = []


def two_type_problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    # The loader's internal entry point takes the config model; only this test needs that.
    with pytest.raises(ConfigError) as exc:
        two_type_load(text, env)
    return [str(p) for p in exc.value.problems]


def two_type_load(text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return loader_module._parse(
        text, source="<test>", base_dir=Path.cwd(), path=None, env=env or {}, model=TwoTypeConfig
    )


def test_device_types_match_the_models_union() -> None:
    assert tuple(loader_module._device_kinds(GatewayConfig)) == DEVICE_TYPES
    assert tuple(loader_module._device_kinds(TwoTypeConfig)) == ("simulated", "modbus")


def test_discriminated_union_gives_the_same_paths_and_messages() -> None:
    text = (
        HEAD
        + '[[devices]]\nid = "m1"\ntype = "modbus"\nhost = 5\n'
        + '[[devices.tags]]\nname = "a"\n[[devices.tags]]\nunit = "bar"\ncolour = "red"\n'
        + '[[devices]]\nid = "m2"\n'
        + '[[devices]]\nid = "m3"\ntype = "bacnet"\n'
        + PUMP
        + "perod_ms = 1\n"
    )
    assert two_type_problems(text) == [
        "devices[0].host: must be a string (got integer 5)",
        "devices[0].tags[1].name: required",
        "devices[0].tags[1].colour: unknown key 'colour'; expected one of: "
        "name, unit, deadband, deadband_percent, heartbeat_s, window_s, forward",
        "devices[1].type: required; one of: simulated, modbus",
        "devices[2].type: unknown device type 'bacnet'; expected one of: simulated, modbus",
        "devices[3].perod_ms: unknown key 'perod_ms'; expected one of: "
        "id, enabled, period_ms, timeout_ms, supervisor, type, model, seed, tags, faults",
    ]
    assert two_type_problems('devices = ["m1"]\n' + HEAD) == [
        "devices[0]: must be a table (got string 'm1')"
    ]


def test_discriminated_union_secrets_and_references() -> None:
    text = (
        HEAD
        + '[[devices]]\nid = "m1"\ntype = "modbus"\nhost = "10.0.0.5"\npassword = { env = "MB_PW" }\n'
        + '[[devices.tags]]\nname = "speed"\n'
        + '[[rules]]\nname = "r"\ndevice = "m1"\ntag = "speed"\nabove = 1\n'
    )
    loaded = two_type_load(text, {"MB_PW": "modbus-secret"})
    assert loaded.secret("devices[0].password") == "modbus-secret"
    assert two_type_problems(text.replace('tag = "speed"', 'tag = "rpm"')) == [
        "devices[0].password.env: environment variable MB_PW is not set",
        "rules[0].tag: device 'm1' has no tag 'rpm'; tags are: speed",
    ]
    assert two_type_problems(
        HEAD + '[[devices]]\nid = "m1"\ntype = "modbus"\nhost = "h"\npassword = "pw"\n'
    ) == [
        'devices[0].password: inline secrets are not allowed; use { file = "..." } or { env = "..." }'
    ]


# --- public API and docs -------------------------------------------------------------------


def test_public_api() -> None:
    assert sorted(gateway.config.__all__) == [
        "LoadedConfig",
        "config_json_schema",
        "load_config",
        "parse_config",
    ]
    for name in gateway.config.__all__:
        assert getattr(gateway.config, name) is getattr(loader_module, name)
    assert set(gateway.config.__all__) <= set(dir(gateway.config))
    with pytest.raises(AttributeError):
        gateway.config.nothing_here  # noqa: B018


def test_fragments_import_alone_without_the_loader() -> None:
    # Adapters import the fragments while the models import the adapters: no cycle allowed.
    code = "import sys, gateway.config.fragments; print('gateway.config.loader' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


DOCUMENTED: dict[str, set[str]] = {
    "[gateway]": set(GatewaySection.model_fields),
    "[http]": set(HttpSection.model_fields),
    "[[http.tokens]]": set(HttpToken.model_fields),
    "[uplink]": set(UplinkSection.model_fields),
    "[uplink.mqtt]": set(MqttOptions.model_fields),
    "[uplink.mqtt.tls]": set(TlsConfig.model_fields),
    "[uplink.queue]": set(QueueConfig.model_fields),
    "[edge]": set(EdgeSection.model_fields),
    "[[devices]]": set(DeviceBase.model_fields) | {"type"},
    "[devices.supervisor]": set(SupervisorConfig.model_fields),
    'type = "simulated"': set(SimulatedDevice.model_fields)
    - set(DeviceBase.model_fields)
    - {"type"},
    "[[devices.tags]]": set(SimulatedTag.model_fields),
    "[[devices.faults]]": set(FaultConfig.model_fields),
    "[[rules]]": set(RuleConfig.model_fields),
    "SecretRef": set(SecretRef.model_fields),
}


def _documented_keys() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in (ROOT / "docs" / "config.md").read_text().splitlines():
        heading = re.match(r"^#+ .*?`([^`]+)`", line)
        if heading:
            current = sections.setdefault(heading[1], set())
        elif current is not None and (row := re.match(r"^\| `(\w+)` \|", line)):
            current.add(row[1])
    return sections


@pytest.mark.parametrize("section", sorted(DOCUMENTED))
def test_docs_describe_every_key(section: str) -> None:
    assert _documented_keys().get(section) == DOCUMENTED[section]
