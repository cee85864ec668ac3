"""`fogmesh provision`: write a node's config.json (and its model blob) to a board. The node gets
its own key derived from the site key, never the site key; secrets come only from a file or the
environment and every output redacts them; the board's firmware checks the config first."""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.field.cli_common import (
    ProgressBar,
    failed,
    positive_seconds,
    standalone_main,
    succeeded,
)
from tools.field.device import Board, DeviceToolError, open_board

__all__ = [
    "CONFIG_PATH",
    "DEFAULT_UART",
    "MODEL_NAME",
    "REDACTED",
    "SITE_KEY_ENV",
    "ProvisionResult",
    "ProvisionToolError",
    "add_arguments",
    "build_config",
    "command_provision",
    "load_site_key",
    "main",
    "parse_nodes",
    "provision",
    "redact",
]

log = logging.getLogger("fogmesh.provision")

SITE_KEY_ENV = "FOGMESH_SITE_KEY"
CONFIG_PATH = "/config.json"  # the flash root: where main.py looks (hal.flash_dir() on an ESP32)
MODEL_NAME = "model.bin"  # one fixed name, so a new model replaces the old one
DEFAULT_UART = {"id": 1, "baud": 115200}  # an ESP32 root's UART to the gateway
REDACTED = "<redacted>"
_SECRET_KEYS = ("node_key", "net_key")
MAX_ID = 0xFFFE

Progress = Callable[[int, int], None]


class ProvisionToolError(DeviceToolError):
    """Provisioning failed or was refused; the message never holds a secret."""


@dataclass(frozen=True, slots=True)
class ProvisionResult:
    port: str
    node_id: int
    role: str
    status: str  # "written", or "unchanged" when the board already held exactly this
    config_written: bool
    model: str | None  # the blob's name in flash, if a model was given
    model_written: bool
    checked_on_board: bool  # the board's own fogmesh.config accepted it (False: no firmware)
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)  # redacted

    def to_json(self) -> dict[str, object]:
        return {
            "ok": True,
            "port": self.port,
            "node_id": self.node_id,
            "role": self.role,
            "status": self.status,
            "config_written": self.config_written,
            "model": self.model,
            "model_written": self.model_written,
            "checked_on_board": self.checked_on_board,
            "seconds": round(self.seconds, 3),
            "config": self.config,
        }


def redact(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config with every key replaced by "<redacted>" (allow list values too)."""
    out = copy.deepcopy(dict(cfg))
    for key in _SECRET_KEYS:
        if key in out:
            out[key] = REDACTED
    if isinstance(out.get("allow"), dict):
        out["allow"] = dict.fromkeys(out["allow"], REDACTED)
    return out


def _parse_key(text: str, where: str) -> bytes:
    # The messages name where the key came from, never what it holds.
    digits = "".join(text.split())
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        raise ProvisionToolError(
            f"{where} does not hold a hex site key (expected 32 to 128 hex digits)"
        ) from None
    if not 16 <= len(key) <= 64:
        raise ProvisionToolError(
            f"{where} holds a {len(key)}-byte key: a site key is 16 to 64 bytes (32 to 128 hex "
            "digits)"
        )
    return key


def load_site_key(path: Path | None, environ: Mapping[str, str] | None = None) -> bytes:
    """The site key from `path` (hex text) or else the environment's FOGMESH_SITE_KEY (hex).

    ProvisionToolError for a missing, unreadable or malformed key; the message never quotes it.
    """
    env = os.environ if environ is None else environ
    if path is not None:
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise ProvisionToolError(f"site key file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not text"
            raise ProvisionToolError(f"cannot read site key file {path}: {reason}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("site key file %s can be read by others: chmod 600 it", path)
        return _parse_key(text, f"site key file {path}")
    if env.get(SITE_KEY_ENV):
        return _parse_key(env[SITE_KEY_ENV], f"the environment's {SITE_KEY_ENV}")
    raise ProvisionToolError(f"no site key: give --site-key-file FILE or set {SITE_KEY_ENV} (hex)")


def parse_nodes(text: str) -> list[int]:
    """ "2-30", "2,3,7-9" -> the sorted node ids; ValueError with the reason otherwise."""
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise ValueError(f"{part!r} is not a node id or a range like 2-30") from None
        if not 1 <= lo <= hi <= MAX_ID:
            raise ValueError(f"{part!r}: node ids are 1..{MAX_ID}, low to high")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def _model_channels(blob: bytes, model: Path) -> tuple[str, ...] | None:
    from models.errors import BlobError
    from models.export import load

    try:
        loaded = load(blob)
    except BlobError as exc:
        raise ProvisionToolError(f"model {model}: {exc}") from exc
    return tuple(loaded.pipeline.channels) if loaded.pipeline is not None else None


def build_config(
    node_id: int,
    site_key: bytes,
    *,
    role: str = "node",
    channel: int = 1,
    model: str | None = None,
    model_channels: tuple[str, ...] | None = None,
    nodes: list[int] | None = None,
    epoch: int = 1,
    sensor: dict[str, Any] | None = None,
    uart: dict[str, Any] | None = None,
    sim_medium: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The config.json of docs/mesh.md "Node configuration" for one node, keys derived here."""
    from tools.mesh.frames import FrameError, net_key, node_key

    if role not in ("node", "root"):
        raise ProvisionToolError(f"role must be node or root, got {role!r}")
    if not 1 <= node_id <= MAX_ID:
        raise ProvisionToolError(f"node id must be 1..{MAX_ID}, got {node_id}")
    if not 1 <= channel <= 14:
        raise ProvisionToolError(f"channel must be 1..14 (the Wi-Fi channel), got {channel}")
    if not 0 <= epoch <= 255:
        raise ProvisionToolError(f"epoch must be 0..255, got {epoch}")
    if nodes and role != "root":
        raise ProvisionToolError("--nodes is the root's allow list: use it with --role root")
    if sensor is None and role == "node":
        # A node must sample something; a model names the channels it expects.
        sensor = {
            "kind": "gen",
            "channels": list(model_channels or ("temp", "vib")),
            "seed": node_id,
        }
    if sensor is not None and model_channels is not None:
        missing = [c for c in model_channels if c not in sensor.get("channels", [])]
        if missing:
            raise ProvisionToolError(
                f"the model reads channels {missing} that the sensor does not have "
                f"({sensor.get('channels')})"
            )
    try:
        cfg: dict[str, Any] = {
            "id": node_id,
            "role": role,
            "channel": channel,
            "node_key": node_key(site_key, node_id).hex(),
        }
        if model is not None:
            cfg["model"] = model
        if sensor is not None:
            cfg["sensor"] = sensor
        if role == "root":
            cfg["net_key"] = net_key(site_key, epoch).hex()
            cfg["epoch"] = epoch
            cfg["allow"] = {
                str(n): node_key(site_key, n).hex() for n in sorted(nodes or []) if n != node_id
            }
            cfg["uart"] = dict(uart or DEFAULT_UART)
    except FrameError as exc:  # its messages carry lengths and ids, never key bytes
        raise ProvisionToolError(str(exc)) from exc
    if sim_medium is not None:
        cfg["sim"] = {"medium": [sim_medium[0], sim_medium[1]]}
    return cfg


def _secrets(cfg: Mapping[str, Any], site_key: bytes) -> list[str]:
    found = [site_key.hex()]
    found += [str(cfg[k]) for k in _SECRET_KEYS if k in cfg]
    found += [str(v) for v in dict(cfg.get("allow") or {}).values()]
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        text = text.replace(s, REDACTED).replace(s.upper(), REDACTED)
    return text


def _check_on_board(board: Board, text: bytes, secrets: list[str]) -> bool:
    """The firmware's own config check, run on the board: False when fogmesh is not there."""
    out = board.exec(
        "import json as _fm_j\n"
        "try:\n from fogmesh import config as _fm_c\nexcept ImportError:\n _fm_c = None\n"
        "if _fm_c is None:\n print('NOFW')\nelse:\n"
        f" print(_fm_j.dumps(_fm_c.check(_fm_j.loads(_fm_d({base64.b64encode(text)!r})))))\n"
        " _fm_sys.modules.pop('fogmesh.config', None)\n"  # config.py is boot-time only
        "_fm_c = _fm_j = None"
    )
    answer = out.decode("utf-8", "replace").strip()
    if answer == "NOFW":
        return False
    try:
        problems = json.loads(answer)
    except ValueError:
        problems = None
    if not isinstance(problems, list):
        raise ProvisionToolError(f"the board's config check answered {_scrub(answer, secrets)!r}")
    if problems:
        text_problems = _scrub("; ".join(str(p) for p in problems), secrets)
        raise ProvisionToolError(f"the board's firmware refuses this config: {text_problems}")
    return True


def provision(
    port: str,
    node_id: int,
    site_key: bytes,
    *,
    role: str = "node",
    channel: int = 1,
    model: Path | None = None,
    nodes: list[int] | None = None,
    epoch: int = 1,
    sensor: dict[str, Any] | None = None,
    uart: dict[str, Any] | None = None,
    sim_medium: tuple[str, int] | None = None,
    progress: Progress | None = None,
    timeout_s: float = 10.0,
) -> ProvisionResult:
    """Write node `node_id`'s config.json (and `model` as model.bin) to the board behind `port`.

    The config holds the node's derived key (and, on a root, the network key and the allow
    list of `nodes`' keys); the site key itself never leaves this process. When the board has
    the firmware, its fogmesh.config checks the config before anything is written. Each file
    goes up atomically and is verified by sha256; files the board already holds identically
    are left alone (status "unchanged" when both were). The board is interrupted, not reset.
    """
    started = time.monotonic()
    blob = None
    channels = None
    if model is not None:
        try:
            blob = Path(model).read_bytes()
        except OSError as exc:
            raise ProvisionToolError(f"cannot read model {model}: {exc.strerror or exc}") from exc
        channels = _model_channels(blob, Path(model))
    cfg = build_config(
        node_id,
        site_key,
        role=role,
        channel=channel,
        model=MODEL_NAME if blob is not None else None,
        model_channels=channels,
        nodes=nodes,
        epoch=epoch,
        sensor=sensor,
        uart=uart,
        sim_medium=sim_medium,
    )
    shown = redact(cfg)
    log.info("provisioning node %d (%s) on %s: %s", node_id, role, port, json.dumps(shown))
    text = (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode()
    secrets = _secrets(cfg, site_key)
    try:
        with open_board(port, timeout_s) as board:
            checked = _check_on_board(board, text, secrets)
            model_written = False
            if blob is not None:
                model_written = _put(board, "/" + MODEL_NAME, blob, progress)
            config_written = _put(board, CONFIG_PATH, text, None, same=_same_config(board, cfg))
    except ProvisionToolError:
        raise
    except DeviceToolError as exc:
        raise ProvisionToolError(_scrub(str(exc), secrets)) from exc
    status = "written" if config_written or model_written else "unchanged"
    log.info("node %d on %s: config %s, model %s", node_id, port, config_written, model_written)
    return ProvisionResult(
        port=port,
        node_id=node_id,
        role=role,
        status=status,
        config_written=config_written,
        model=MODEL_NAME if blob is not None else None,
        model_written=model_written,
        checked_on_board=checked,
        seconds=time.monotonic() - started,
        config=shown,
    )


def _same_config(board: Board, cfg: Mapping[str, Any]) -> bool:
    # Compared as JSON values, not bytes: a config the node re-saved itself is still the same.
    raw = board.read(CONFIG_PATH)
    if raw is None:
        return False
    try:
        return bool(json.loads(raw) == cfg)
    except ValueError:
        return False


def _put(
    board: Board, path: str, data: bytes, progress: Progress | None, same: bool | None = None
) -> bool:
    """Write `data` to `path` unless the board holds it already -> whether it was written."""
    want = hashlib.sha256(data).hexdigest()
    if same is None:
        same = board.sha256(path) == want
    if same:
        return False
    got = board.write_atomic(path, data, progress)
    if got != want:
        raise ProvisionToolError(
            f"verify failed for {path} on {board.port}: the board reads sha256 {got}: retry"
        )
    return True


# --- command line ------------------------------------------------------------------------


def _node_id_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node id (1..{MAX_ID})")
    return value


def _range_arg(lo: int, hi: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} ({lo}..{hi})")
        return value

    return parse


def _nodes_arg(text: str) -> list[int]:
    try:
        return parse_nodes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_map_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _medium_arg(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, port


class _RefuseSecret(argparse.Action):
    """A key given on the command line shows in `ps` and shell history: refused, not echoed."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            f"{option_string} is refused: secrets never come from the command line; use "
            f"--site-key-file FILE or the environment variable {SITE_KEY_ENV}"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No abbreviations: "--site-key HEX" must not be read as "--site-key-file HEX".
    p.allow_abbrev = False
    p.add_argument(
        "--port", required=True, help="the board's serial port, by-id path or pyserial URL"
    )
    p.add_argument(
        "--node-id", required=True, type=_node_id_arg, help=f"the node's id, 1..{MAX_ID}"
    )
    p.add_argument(
        "--site-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the site key as hex text (default: the environment variable {SITE_KEY_ENV}); "
        "the board gets only keys derived from it",
    )
    for name in ("--site-key", "--node-key", "--net-key", "--key"):
        p.add_argument(name, action=_RefuseSecret, nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--model", type=Path, default=None, help="a model blob (fogmesh model export) to copy"
    )
    p.add_argument("--role", choices=("node", "root"), default="node")
    p.add_argument(
        "--nodes",
        type=_nodes_arg,
        default=None,
        metavar="IDS",
        help="root only: the node ids allowed to join, e.g. 2-30 or 2,3,7-9",
    )
    p.add_argument(
        "--channel", type=_range_arg(1, 14, "a Wi-Fi channel"), default=1, help="default 1"
    )
    p.add_argument(
        "--epoch",
        type=_range_arg(0, 255, "a key epoch"),
        default=1,
        help="root only: the network key's epoch (default 1)",
    )
    p.add_argument(
        "--sensor-json",
        type=_json_map_arg,
        default=None,
        metavar="JSON",
        help='the sensor map, e.g. \'{"kind": "adc", "channels": ["vib"], "pins": [34]}\' '
        "(default for a node: the gen sensor, with the model's channels if one is given)",
    )
    p.add_argument(
        "--uart-json",
        type=_json_map_arg,
        default=None,
        metavar="JSON",
        help=f"root only: its UART to the gateway (default {json.dumps(DEFAULT_UART)})",
    )
    p.add_argument(
        "--sim-medium",
        type=_medium_arg,
        default=None,
        metavar="HOST:PORT",
        help="the simulated radio medium (a board running the MicroPython unix port)",
    )
    p.add_argument(
        "--timeout-s",
        type=positive_seconds,
        default=10.0,
        help="how long the board may stay silent (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def command_provision(args: argparse.Namespace) -> int:
    """Exit 0 provisioned (or unchanged), 1 a ProvisionToolError, 2 no site key given."""
    path = Path(args.site_key_file) if args.site_key_file is not None else None
    if path is None and not os.environ.get(SITE_KEY_ENV):
        print(
            f"fogmesh provision: error: no site key: give --site-key-file FILE or set "
            f"{SITE_KEY_ENV} (hex)",
            file=sys.stderr,
        )
        return 2
    bar = None if args.json else ProgressBar(sys.stderr, "model")
    try:
        site_key = load_site_key(path)
        result = provision(
            args.port,
            args.node_id,
            site_key,
            role=args.role,
            channel=args.channel,
            model=args.model,
            nodes=args.nodes,
            epoch=args.epoch,
            sensor=args.sensor_json,
            uart=args.uart_json,
            sim_medium=args.sim_medium,
            progress=bar,
            timeout_s=args.timeout_s,
        )
    except ProvisionToolError as exc:
        return failed("fogmesh provision", exc, bar, args.json)
    if succeeded(bar, args.json, result.to_json()):
        return 0
    if result.status == "unchanged":
        print(f"node {result.node_id} on {result.port} already holds this provisioning: unchanged")
    else:
        files = [
            name
            for name, written in (
                ("config.json", result.config_written),
                (result.model, result.model_written),
            )
            if name and written
        ]
        checked = (
            "checked by the board's firmware"
            if result.checked_on_board
            else "not checked (no fogmesh firmware on the board yet: run fogmesh deploy)"
        )
        print(
            f"provisioned node {result.node_id} ({result.role}, channel "
            f"{result.config['channel']}) on {result.port}: wrote {', '.join(files)}; {checked}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        "fogmesh provision",
        "Write a node's config.json with its derived key (and model) to a board.",
        add_arguments,
        command_provision,
    )


if __name__ == "__main__":
    sys.exit(main())
