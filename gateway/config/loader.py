"""Loads the gateway's TOML config into typed models and reports every problem with its dotted path.

The only I/O is reading the TOML file, secret files and the environment: structure, secrets and
references between sections are all checked, and all their problems reported together, before
the gateway opens a single connection. Model files (`[[models]] path`) are only made absolute
here; the edge stage reads and checks them when it is built (gateway.inference.load_runners).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from functools import cache
from inspect import isclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from gateway.config.fragments import DeviceBase, SecretRef, TagBase
from gateway.config.models import MIN_TOKEN_CHARS, OPERATOR, GatewayConfig
from gateway.errors import ConfigError, ConfigProblem
from retrofit_adapters.simulated.config import PROCESS_SIGNALS, SimulatedDevice

Loc = tuple[str | int, ...]
Found = tuple[Loc, str]  # a problem before rendering; the loc orders problems as in the file

INLINE_SECRET = 'inline secrets are not allowed; use { file = "..." } or { env = "..." }'
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_ID = "urn:fogmesh:schema:gateway-config:1"


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus what it needs from outside itself: its directory and its secrets."""

    config: GatewayConfig
    path: Path | None  # the file, if loaded from one
    base_dir: Path  # relative paths in the config are relative to this (the file's directory)
    # Keyed by dotted path, e.g. "uplink.mqtt.password"; out of the repr since values are secret.
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # A caller's dict stays theirs; nobody downstream can change a secret by accident.
        object.__setattr__(self, "secrets", types.MappingProxyType(dict(self.secrets)))

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def data_dir(self) -> Path:
        return self.resolve_path(self.config.gateway.data_dir)

    @property
    def queue_path(self) -> Path:
        path = self.config.uplink.queue.path
        return self.data_dir / "queue.db" if path is None else self.resolve_path(path)

    @property
    def sink_url(self) -> str:
        """uplink.url with a relative SQLite path made absolute against base_dir."""
        url = self.config.uplink.url
        parts = urlsplit(url)
        # sqlite:///rel has the path "/rel", sqlite:////abs has "//abs"
        if parts.scheme != "sqlite" or parts.netloc or parts.path.startswith("//"):
            return url
        out = f"sqlite:///{self.resolve_path(parts.path[1:])}"
        return f"{out}?{parts.query}" if parts.query else out

    def secret(self, dotted: str) -> str | None:
        return self.secrets.get(dotted)

    def http_tokens(self) -> list[tuple[str, str]]:
        """(name, token) of every bearer token of [http], `token` first as OPERATOR."""
        http = self.config.http
        out: list[tuple[str, str]] = []
        if http.token is not None:
            out.append((OPERATOR, self.secrets["http.token"]))
        for i, t in enumerate(http.tokens):
            out.append((t.name, self.secrets[f"http.tokens[{i}].token"]))
        return out


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file; raise ConfigError with every problem found."""
    file = Path(path).absolute()
    source = str(path)
    try:
        # utf-8-sig: editors on Windows like to start the file with a byte-order mark
        text = file.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read file: {_reason(exc)}")], source) from exc
    except UnicodeDecodeError as exc:
        problem = ConfigProblem("", f"not UTF-8 text (bad byte at offset {exc.start})")
        raise ConfigError([problem], source) from exc
    return _parse(text, source=source, base_dir=file.parent, path=file, env=env)


def parse_config(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Validate config text; relative paths resolve against base_dir (default: the cwd)."""
    base = (base_dir if base_dir is not None else Path.cwd()).absolute()
    return _parse(text, source=source, base_dir=base, path=None, env=env)


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file, for completion and checks in editors."""
    schema = GatewayConfig.model_json_schema()
    schema.pop("title", None)
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": "fogmesh gateway config",
        "description": "The gateway's TOML config; see docs/config.md.",
        **schema,
    }


def _parse(
    text: str,
    *,
    source: str,
    base_dir: Path,
    path: Path | None,
    env: Mapping[str, str] | None,
    model: type[GatewayConfig] = GatewayConfig,  # tests pass a config with more device types
) -> LoadedConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", _toml_message(exc, text))], source) from exc
    config, found = _validate(raw, model)
    secrets, secret_problems = _resolve_secrets(
        raw, model, base_dir, os.environ if env is None else env
    )
    found += secret_problems
    if config is not None:
        found += _check_references(config)
        found += _check_tokens(config, secrets)
    if config is None or found:
        # Not chained to pydantic's error: its text carries the input values, which may be secrets.
        raise ConfigError(_ordered(found, model), source)
    config = _resolve_model_paths(config, base_dir)
    return LoadedConfig(config=config, path=path, base_dir=base_dir, secrets=secrets)


def _resolve_model_paths(cfg: GatewayConfig, base_dir: Path) -> GatewayConfig:
    # The edge stage gets the GatewayConfig alone, so a model's file is made absolute here,
    # against the config file's directory like every other relative path of the file.
    if not any(not Path(m.path).is_absolute() for m in cfg.models):
        return cfg
    models = [
        m if Path(m.path).is_absolute() else m.model_copy(update={"path": str(base_dir / m.path)})
        for m in cfg.models
    ]
    return cfg.model_copy(update={"models": models})


# --- TOML syntax ---------------------------------------------------------------------------

_TOML_AT = re.compile(
    r"^(?P<msg>.*?) \(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$", re.S
)
_TOML_KEY = re.compile(r"\((?:'[^']*',? ?)+\)")


def _toml_message(exc: tomllib.TOMLDecodeError, text: str) -> str:
    m = _TOML_AT.match(str(exc))
    msg = m["msg"] if m else str(exc)
    if m and m["line"]:
        line, col = int(m["line"]), int(m["col"])
    else:  # "at end of document": point there, so the message always has a position
        line = text.count("\n") + 1
        col = len(text.rsplit("\n", 1)[-1]) + 1
    if msg == "Illegal character '\\n'":
        msg = "unexpected end of line (a string not closed?)"
    # tomllib names tables by tuple, "('uplink', 'mqtt')"; the file says [uplink.mqtt]
    msg = _TOML_KEY.sub(lambda k: "[" + ".".join(re.findall(r"'([^']*)'", k[0])) + "]", msg)
    return f"TOML syntax error at line {line}, column {col}: {msg[:1].lower()}{msg[1:]}"


# --- structure -----------------------------------------------------------------------------


@cache
def _device_kinds(model: type[GatewayConfig]) -> dict[str, type[BaseModel]]:
    """Device `type` value -> device model, read from the `devices` field of the config model."""
    (item,) = get_args(model.model_fields["devices"].annotation)
    kinds: dict[str, type[BaseModel]] = {}
    for member in _members(item):
        if isclass(member) and issubclass(member, BaseModel):
            for value in get_args(member.model_fields["type"].annotation):
                kinds[value] = member
    return kinds


def _members(ann: Any) -> list[Any]:
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) in (Union, types.UnionType):
        return [m for a in get_args(ann) if a is not type(None) for m in _members(a)]
    return [ann]


def _validate(
    raw: dict[str, Any], model: type[GatewayConfig]
) -> tuple[GatewayConfig | None, list[Found]]:
    kinds = _device_kinds(model)
    found: list[Found] = []
    # `type` is checked here so that its message is the same with one device type (no union,
    # so no discriminator) as with many; devices of unknown type are not validated further.
    untyped: set[int] = set()
    devices = raw.get("devices")
    if isinstance(devices, list):
        for i, dev in enumerate(devices):
            problem = _check_device_type(i, dev, kinds)
            if problem is not None:
                found.append(problem)
                untyped.add(i)
    try:
        config = model.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = _strip_tag(err["loc"], kinds)
            if len(loc) >= 2 and loc[0] == "devices" and loc[1] in untyped:
                continue
            found.append((loc, _message(err, loc, model, raw)))
        return None, found
    return (None, found) if found else (config, found)


def _check_device_type(i: int, dev: Any, kinds: Mapping[str, Any]) -> Found | None:
    names = ", ".join(kinds)
    at: Loc = ("devices", i, "type")
    if not isinstance(dev, dict):
        return ("devices", i), f"must be a table (got {_describe(dev)})"
    if "type" not in dev:
        return at, f"required; one of: {names}"
    kind = dev["type"]
    if not isinstance(kind, str):
        return at, f"must be one of: {names} (got {_describe(kind)})"
    if kind not in kinds:
        return at, f"unknown device type {_quote(kind)}; expected one of: {names}"
    return None


def _strip_tag(loc: Loc, kinds: Mapping[str, Any]) -> Loc:
    # With a discriminated union pydantic puts the tag after the index: devices.0.simulated.tags
    if (
        len(kinds) > 1
        and len(loc) >= 3
        and loc[0] == "devices"
        and isinstance(loc[1], int)
        and loc[2] in kinds
    ):
        return loc[:2] + loc[3:]
    return loc


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "list_type": "an array",
    "finite_number": "a finite number",
}
_BOUNDS = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be {} or more"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be {} or less"),
}


def _message(err: ErrorDetails, loc: Loc, model: type[GatewayConfig], raw: Any) -> str:
    kind, value, ctx = err["type"], err["input"], err.get("ctx") or {}
    along = _annotations_along(model, loc, raw)
    here = along[-1]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        parent = along[-2]
        known = (
            list(parent.model_fields) if isclass(parent) and issubclass(parent, BaseModel) else []
        )
        return f"unknown key {_quote(loc[-1])}; expected one of: {', '.join(known)}"
    if _is_secret(here) and not isinstance(value, dict):
        return INLINE_SECRET
    if kind == "literal_error":
        choices = get_args(here) if get_origin(here) is Literal else ()
        if choices:
            return "must be one of " + ", ".join(_quote(c) for c in choices)
        return "must be one of " + str(ctx.get("expected", ""))
    if kind == "list_type" and isinstance(value, dict):
        dotted = ".".join(p for p in loc if isinstance(p, str))
        return f"must be an array of tables: write [[{dotted}]], not [{dotted}]"
    if kind in _EXPECTED:
        hide = any(_is_secret(a) for a in along)  # never echo what was written inside a secret
        return f"must be {_EXPECTED[kind]} (got {_describe(value, hide=hide)})"
    if kind in _BOUNDS:
        key, template = _BOUNDS[kind]
        return template.format(_number(ctx.get(key)))
    msg = err["msg"]  # our PydanticCustomErrors land here with their own words
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return msg


def _annotations_along(model: type[BaseModel], loc: Loc, raw: Any) -> list[Any]:
    """The annotation at loc[:0], loc[:1], ... loc; None once the path leaves the models."""
    ann: Any = model
    node = raw
    out: list[Any] = [ann]
    for part in loc:
        if isinstance(part, int):
            ann = get_args(ann)[0] if get_origin(ann) is list else None
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
        else:
            fields = ann.model_fields if isclass(ann) and issubclass(ann, BaseModel) else {}
            ann = fields[part].annotation if part in fields else None
            node = node.get(part) if isinstance(node, dict) else None
        ann = _unwrap(ann, node)
        out.append(ann)
    return out


def _unwrap(ann: Any, node: Any) -> Any:
    """Strip Annotated and `| None`; of a union of device models, pick the one `node` names."""
    members = _members(ann)
    if len(members) == 1:
        return members[0]
    kind = node.get("type") if isinstance(node, dict) else None
    for m in members:
        if (
            isclass(m)
            and issubclass(m, BaseModel)
            and "type" in m.model_fields
            and kind in get_args(m.model_fields["type"].annotation)
        ):
            return m
    return ann


def _is_secret(ann: Any) -> bool:
    return isclass(ann) and issubclass(ann, SecretRef)


# --- rendering -----------------------------------------------------------------------------


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _ordered(found: list[Found], model: type[BaseModel]) -> list[ConfigProblem]:
    # Sections in the order of the model, items in file order; sort is stable, so within one
    # item structure comes before secrets before references.
    sections = list(model.model_fields)

    def key(f: Found) -> tuple[int, int]:
        loc = f[0]
        if not loc:
            return (-1, -1)
        section = sections.index(loc[0]) if loc[0] in sections else len(sections)
        item = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
        return (section, item)

    return [ConfigProblem(_dotted(loc), msg) for loc, msg in sorted(found, key=key)]


def _quote(v: object, limit: int = 40) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= limit else v[: limit - 3] + "...")
    return str(v)


def _number(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _describe(v: object, *, hide: bool = False) -> str:
    """`integer 5`, `string '5'`: the TOML type of a value, and the value unless hidden."""
    # bool before int: True is an int in Python, a boolean in TOML
    if isinstance(v, bool):
        name, shown = "boolean", "true" if v else "false"
    elif isinstance(v, int):
        name, shown = "integer", str(v)
    elif isinstance(v, float):
        name, shown = "float", repr(v)
    elif isinstance(v, str):
        name, shown = "string", _quote(v)
    elif isinstance(v, datetime | date | time):
        name, shown = type(v).__name__, v.isoformat()
    elif isinstance(v, list):
        return "array"
    elif isinstance(v, dict):
        return "table"
    else:
        return type(v).__name__
    return name if hide else f"{name} {shown}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --- secrets -------------------------------------------------------------------------------


def _resolve_secrets(
    raw: dict[str, Any], model: type[BaseModel], base_dir: Path, env: Mapping[str, str]
) -> tuple[dict[str, str], list[Found]]:
    # Walks the raw data rather than the models so that a missing secret is reported together
    # with the structural problems of the rest of the file.
    secrets: dict[str, str] = {}
    found: list[Found] = []
    for loc, ref in _secret_refs(model, raw, ()):
        keys = set(ref) if isinstance(ref, dict) else set()
        if (
            len(keys) != 1
            or not keys <= {"file", "env"}
            or not isinstance(ref[next(iter(keys))], str)
        ):
            continue  # not a well-formed reference; validation reports it
        if "file" in ref:
            value, problem = _read_secret_file(base_dir / ref["file"])
            where = (*loc, "file")
        else:
            value, problem = _read_secret_env(ref["env"], env)
            where = (*loc, "env")
        if problem is not None:
            found.append((where, problem))
        else:
            secrets[_dotted(loc)] = value
    return secrets, found


def _secret_refs(ann: Any, node: Any, loc: Loc) -> Iterator[tuple[Loc, Any]]:
    ann = _unwrap(ann, node)
    if _is_secret(ann):
        yield loc, node
    elif isclass(ann) and issubclass(ann, BaseModel) and isinstance(node, dict):
        for name, info in ann.model_fields.items():
            if name in node:
                yield from _secret_refs(info.annotation, node[name], (*loc, name))
    elif get_origin(ann) is list and isinstance(node, list):
        (item,) = get_args(ann)
        for i, child in enumerate(node):
            yield from _secret_refs(item, child, (*loc, i))


def _read_secret_file(path: Path) -> tuple[str, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return "", f"cannot read '{path}': {_reason(exc)}"
    except UnicodeDecodeError:
        return "", f"cannot read '{path}': not UTF-8 text"
    # `echo secret > file` adds a newline that is not part of the secret
    value = text.removesuffix("\n").removesuffix("\r")
    return (value, None) if value else ("", f"secret file '{path}' is empty")


def _read_secret_env(name: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    if name not in env:
        return "", f"environment variable {name} is not set"
    value = env[name].removesuffix("\n").removesuffix("\r")
    return (value, None) if value else ("", f"environment variable {name} is empty")


# --- references between sections ----------------------------------------------------------


def _check_references(cfg: GatewayConfig) -> list[Found]:
    found: list[Found] = []
    first: dict[str, int] = {}
    # Every device model derives from DeviceBase; the union type itself is opaque to mypy.
    devices = cast(list[DeviceBase], cfg.devices)
    for i, dev in enumerate(devices):
        if dev.id in first:
            msg = f"duplicate device id {_quote(dev.id)} (also devices[{first[dev.id]}])"
            found.append((("devices", i, "id"), msg))
        else:
            first[dev.id] = i
        found += _check_tags(i, dev)
        for model, check in _DEVICE_CHECKS.items():
            if isinstance(dev, model):
                found += check(i, dev)

    rule_first: dict[str, int] = {}
    for i, rule in enumerate(cfg.rules):
        if rule.name in rule_first:
            msg = f"duplicate rule name {_quote(rule.name)} (also rules[{rule_first[rule.name]}])"
            found.append((("rules", i, "name"), msg))
        else:
            rule_first[rule.name] = i
        if rule.device not in first:
            known = f"devices are: {', '.join(first)}" if first else "no devices are configured"
            found.append((("rules", i, "device"), f"no device {_quote(rule.device)}; {known}"))
            continue
        dev = devices[first[rule.device]]
        if not dev.enabled:
            msg = f"device {_quote(dev.id)} is disabled; enable it or remove the rule"
            found.append((("rules", i, "device"), msg))
        tags = _tag_names(dev)
        if rule.tag not in tags:
            found.append((("rules", i, "tag"), _no_tag(dev.id, rule.tag, tags)))

    model_first: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        if m.name in model_first:
            msg = f"duplicate model name {_quote(m.name)} (also models[{model_first[m.name]}])"
            found.append((("models", i, "name"), msg))
        else:
            model_first[m.name] = i
        if m.device not in first:
            known = f"devices are: {', '.join(first)}" if first else "no devices are configured"
            found.append((("models", i, "device"), f"no device {_quote(m.device)}; {known}"))
            continue
        dev = devices[first[m.device]]
        if not dev.enabled:
            msg = f"device {_quote(dev.id)} is disabled; enable it or remove the model"
            found.append((("models", i, "device"), msg))
        tags = _tag_names(dev)
        seen: dict[str, int] = {}
        for j, tag in enumerate(m.tags):
            if tag in seen:
                msg = f"duplicate tag {_quote(tag)} (also models[{i}].tags[{seen[tag]}])"
                found.append((("models", i, "tags", j), msg))
                continue
            seen[tag] = j
            if tag not in tags:
                found.append((("models", i, "tags", j), _no_tag(dev.id, tag, tags)))
    return found


def _tag_names(dev: Any) -> list[str]:
    # An adapter may derive its tags (a simulated device without tags has every signal)
    if hasattr(dev, "tag_names"):
        names: list[str] = dev.tag_names()
        return names
    return [t.name for t in _tags(dev)]


def _tags(dev: Any) -> list[TagBase]:
    tags = getattr(dev, "tags", [])
    return [t for t in tags if isinstance(t, TagBase)]


def _no_tag(device: str, tag: str, tags: list[str]) -> str:
    known = ", ".join(dict.fromkeys(tags))  # a duplicate is reported on its own
    return f"device {_quote(device)} has no tag {_quote(tag)}; tags are: {known}"


def _check_tags(i: int, dev: Any) -> list[Found]:
    found: list[Found] = []
    first: dict[str, int] = {}
    for j, tag in enumerate(_tags(dev)):
        if tag.name in first:
            msg = (
                f"duplicate tag name {_quote(tag.name)} (also devices[{i}].tags[{first[tag.name]}])"
            )
            found.append((("devices", i, "tags", j, "name"), msg))
        else:
            first[tag.name] = j
    return found


def _check_simulated(i: int, dev: SimulatedDevice) -> list[Found]:
    found: list[Found] = []
    signals = PROCESS_SIGNALS[dev.model]
    known = ", ".join(signals)
    for j, tag in enumerate(dev.tags):
        if tag.name not in signals:
            msg = (
                f"model {_quote(dev.model)} has no signal {_quote(tag.name)}; signals are: {known}"
            )
            found.append((("devices", i, "tags", j, "name"), msg))
    tags = dev.tag_names()
    for j, fault in enumerate(dev.faults):
        if fault.tag is not None and fault.tag not in tags:
            found.append((("devices", i, "faults", j, "tag"), _no_tag(dev.id, fault.tag, tags)))
    return found


def _check_tokens(cfg: GatewayConfig, secrets: Mapping[str, str]) -> list[Found]:
    # Names are what the audit log records, so two tokens must never share one; neither may
    # two names share a token (the audit could not tell who wrote). Messages name no secret.
    found: list[Found] = []
    http = cfg.http
    refs: list[tuple[Loc, Loc, str]] = []  # (name loc, token loc, name)
    if http.token is not None:
        refs.append((("http", "token"), ("http", "token"), OPERATOR))
    for i, t in enumerate(http.tokens):
        refs.append((("http", "tokens", i, "name"), ("http", "tokens", i, "token"), t.name))
    names: dict[str, str] = {}
    values: dict[str, str] = {}
    for name_loc, token_loc, name in refs:
        if name in names:
            found.append((name_loc, f"duplicate token name {_quote(name)} (also {names[name]})"))
        else:
            names[name] = _dotted(name_loc)
        value = secrets.get(_dotted(token_loc))
        if value is None:
            continue  # unreadable: reported with the secrets
        if len(value) < MIN_TOKEN_CHARS:
            found.append(
                (
                    token_loc,
                    f"token too short ({len(value)} characters); use at least "
                    f"{MIN_TOKEN_CHARS}, e.g. the output of `openssl rand -hex 32`",
                )
            )
        elif value in values:
            found.append((token_loc, f"the same token as {values[value]}; give each its own"))
        else:
            values[value] = _dotted(token_loc)
    return found


# Checks that only one adapter's devices need; keyed by the adapter's device model.
_DEVICE_CHECKS: dict[type[BaseModel], Callable[[int, Any], list[Found]]] = {
    SimulatedDevice: _check_simulated,
}
