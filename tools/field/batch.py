"""`fogmesh batch provision --manifest FILE`: deploy and provision every board a TOML manifest
lists, one worker thread per port, each board's redacted log in its own file, and one summary."""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigProblem, FogmeshError
from tools.field.cli_common import positive_seconds, print_json, standalone_main
from tools.field.deploy import deploy
from tools.field.device import DeviceToolError
from tools.field.provision import (
    MAX_ID,
    SITE_KEY_ENV,
    load_site_key,
    parse_nodes,
    provision,
)

__all__ = [
    "BatchError",
    "BatchResult",
    "BoardResult",
    "BoardSpec",
    "Manifest",
    "add_arguments",
    "command_batch_provision",
    "load_manifest",
    "main",
    "run_batch",
]

log = logging.getLogger("fogmesh.batch")

PROG = "fogmesh batch provision"
_LOGGERS = "fogmesh"  # the parent of fogmesh.deploy, fogmesh.provision and this module's logger
_SECRET_NAMES = ("site_key", "node_key", "net_key", "key")
_TOP_KEYS = {"site_key_file", "deploy", "source", "log_dir", "boards"}
_BOARD_KEYS = {"port", "node_id", "model", "role", "channel", "nodes", "epoch", "sensor", "uart"}


class BatchError(FogmeshError):
    """The manifest is wrong (every problem with its path) or the site key cannot be loaded."""

    def __init__(self, problems: list[ConfigProblem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(p) for p in problems))


@dataclass(frozen=True, slots=True)
class BoardSpec:
    port: str
    node_id: int
    model: Path | None = None
    role: str = "node"
    channel: int = 1
    nodes: list[int] | None = None
    epoch: int = 1
    sensor: dict[str, Any] | None = None
    uart: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    site_key_file: Path | None  # None: the environment's FOGMESH_SITE_KEY
    deploy: bool
    source: bool  # deploy the package as .py rather than .mpy
    log_dir: Path
    boards: tuple[BoardSpec, ...]


@dataclass(frozen=True, slots=True)
class BoardResult:
    port: str
    node_id: int
    status: str  # "provisioned", "unchanged" or "failed"
    error: str | None
    deployed: int  # files uploaded by the deploy step
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "port": self.port,
            "node_id": self.node_id,
            "status": self.status,
            "error": self.error,
            "deployed": self.deployed,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class BatchResult:
    boards: tuple[BoardResult, ...]
    seconds: float
    log_dir: Path = field(default=Path("."))

    @property
    def ok(self) -> bool:
        return all(b.status != "failed" for b in self.boards)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "boards": [b.to_json() for b in self.boards],
            "seconds": round(self.seconds, 3),
        }


# --- the manifest ------------------------------------------------------------------------


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_board(
    i: int, raw: object, base: Path, problems: list[ConfigProblem]
) -> BoardSpec | None:
    where = f"boards[{i}]"
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(where, "must be a table ([[boards]])"))
        return None
    before = len(problems)

    def bad(key: str, message: str) -> None:
        problems.append(ConfigProblem(f"{where}.{key}", message))

    for key in sorted(raw):
        if key in _SECRET_NAMES:
            bad(key, "a key is never given in the manifest: use site_key_file or " + SITE_KEY_ENV)
        elif key not in _BOARD_KEYS:
            bad(key, f"unknown key (expected one of {', '.join(sorted(_BOARD_KEYS))})")
    port = raw.get("port")
    if port is None:
        bad("port", "missing")
    elif not isinstance(port, str) or not port:
        bad("port", "must be a serial port path or URL")
    node_id = raw.get("node_id")
    if node_id is None:
        bad("node_id", "missing")
    elif not _int(node_id) or not 1 <= node_id <= MAX_ID:
        bad("node_id", f"must be an integer 1..{MAX_ID}")
    model = raw.get("model")
    model_path = None
    if model is not None:
        if not isinstance(model, str):
            bad("model", "must be a file path")
        else:
            model_path = base / model
            if not model_path.is_file():
                bad("model", f"{model_path} does not exist")
    role = raw.get("role", "node")
    if role not in ("node", "root"):
        bad("role", "must be node or root")
    channel = raw.get("channel", 1)
    if not _int(channel) or not 1 <= channel <= 14:
        bad("channel", "must be a Wi-Fi channel 1..14")
    epoch = raw.get("epoch", 1)
    if not _int(epoch) or not 0 <= epoch <= 255:
        bad("epoch", "must be 0..255")
    nodes_raw = raw.get("nodes")
    nodes: list[int] | None = None
    if nodes_raw is not None:
        if isinstance(nodes_raw, str):
            try:
                nodes = parse_nodes(nodes_raw)
            except ValueError as exc:
                bad("nodes", str(exc))
        elif isinstance(nodes_raw, list) and all(_int(n) and 1 <= n <= MAX_ID for n in nodes_raw):
            nodes = sorted(set(nodes_raw))
        else:
            bad("nodes", f'must be a range like "2-30" or a list of ids 1..{MAX_ID}')
        if role != "root":
            bad("nodes", 'the root\'s allow list: only with role = "root"')
    for key in ("sensor", "uart"):
        if key in raw and not isinstance(raw[key], dict):
            bad(key, "must be a table")
    if len(problems) != before:
        return None
    return BoardSpec(
        port=str(port),
        node_id=int(str(node_id)),
        model=model_path,
        role=str(role),
        channel=int(channel),
        nodes=nodes,
        epoch=int(epoch),
        sensor=raw.get("sensor"),
        uart=raw.get("uart"),
    )


def load_manifest(path: Path) -> Manifest:
    """The manifest at `path`, relative paths taken from its folder; BatchError listing every
    problem (with its path, e.g. boards[2].node_id) when anything is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise BatchError([ConfigProblem("", "does not exist")], str(path)) from None
    except OSError as exc:
        raise BatchError([ConfigProblem("", f"cannot read: {exc.strerror}")], str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise BatchError([ConfigProblem("", f"not TOML: {exc}")], str(path)) from exc
    base = path.parent
    problems: list[ConfigProblem] = []
    for key in sorted(raw):
        if key in _SECRET_NAMES:
            problems.append(
                ConfigProblem(
                    key,
                    f"a key is never given in the manifest: use site_key_file or {SITE_KEY_ENV}",
                )
            )
        elif key not in _TOP_KEYS:
            problems.append(
                ConfigProblem(key, f"unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})")
            )
    key_file = raw.get("site_key_file")
    if key_file is not None and not isinstance(key_file, str):
        problems.append(ConfigProblem("site_key_file", "must be a file path"))
    for key in ("deploy", "source"):
        if key in raw and not isinstance(raw[key], bool):
            problems.append(ConfigProblem(key, "must be true or false"))
    log_dir = raw.get("log_dir")
    if log_dir is not None and not isinstance(log_dir, str):
        problems.append(ConfigProblem("log_dir", "must be a folder path"))
    boards_raw = raw.get("boards")
    specs: list[BoardSpec | None] = []
    if boards_raw is None:
        problems.append(ConfigProblem("boards", "missing: list each board as a [[boards]] table"))
    elif not isinstance(boards_raw, list) or not boards_raw:
        problems.append(ConfigProblem("boards", "must be one or more [[boards]] tables"))
    else:
        specs = [_check_board(i, b, base, problems) for i, b in enumerate(boards_raw)]
        # Duplicates are checked on the raw values so a board with other faults still counts.
        for key in ("port", "node_id"):
            first: dict[object, int] = {}
            for i, b in enumerate(boards_raw):
                value = b.get(key) if isinstance(b, dict) else None
                if value is None or isinstance(value, (dict, list)):
                    continue
                if value in first:
                    problems.append(
                        ConfigProblem(
                            f"boards[{i}].{key}", f"{value!r} is already boards[{first[value]}]'s"
                        )
                    )
                else:
                    first[value] = i
    if problems:
        raise BatchError(problems, str(path))
    return Manifest(
        path=path,
        site_key_file=base / key_file if isinstance(key_file, str) else None,
        deploy=bool(raw.get("deploy", True)),
        source=bool(raw.get("source", False)),
        log_dir=base / log_dir if isinstance(log_dir, str) else path.with_name(path.name + ".logs"),
        boards=tuple(s for s in specs if s is not None),
    )


# --- running it --------------------------------------------------------------------------


class _OnlyThread(logging.Filter):
    def __init__(self, ident: int) -> None:
        super().__init__()
        self._ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self._ident


class _ToRoot(logging.Handler):
    """What the fogmesh loggers showed before the batch raised their level: forwarded to the
    root logger's handlers (stderr, -v), so per-board detail does not flood the terminal."""

    def __init__(self, level: int) -> None:
        super().__init__(level)

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


@contextmanager
def _board_logging() -> Iterator[None]:
    top = logging.getLogger(_LOGGERS)
    saved = (top.level, top.propagate)
    forward = _ToRoot(top.getEffectiveLevel())
    top.addHandler(forward)
    top.setLevel(logging.DEBUG)
    top.propagate = False
    try:
        yield
    finally:
        top.removeHandler(forward)
        top.setLevel(saved[0])
        top.propagate = saved[1]


def _run_board(
    spec: BoardSpec, manifest: Manifest, site_key: bytes, timeout_s: float
) -> BoardResult:
    started = time.monotonic()
    handler = logging.FileHandler(manifest.log_dir / f"{spec.node_id}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OnlyThread(threading.get_ident()))
    top = logging.getLogger(_LOGGERS)
    top.addHandler(handler)
    deployed = 0
    try:
        log.info("node %d on %s: start", spec.node_id, spec.port)
        removed = 0
        if manifest.deploy:
            d = deploy(spec.port, source=manifest.source, timeout_s=timeout_s)
            deployed, removed = len(d.uploaded), len(d.removed)
            log.info("node %d: deployed %d files, removed %d", spec.node_id, deployed, removed)
        p = provision(
            spec.port,
            spec.node_id,
            site_key,
            role=spec.role,
            channel=spec.channel,
            model=spec.model,
            nodes=spec.nodes,
            epoch=spec.epoch,
            sensor=spec.sensor,
            uart=spec.uart,
            timeout_s=timeout_s,
        )
        same = p.status == "unchanged" and deployed == 0 and removed == 0
        status = "unchanged" if same else "provisioned"
        error = None
        log.info("node %d on %s: %s", spec.node_id, spec.port, status)
    except FogmeshError as exc:  # provision's messages are already scrubbed of keys
        status, error = "failed", str(exc)
        log.error("node %d on %s: failed: %s", spec.node_id, spec.port, error)
    except Exception as exc:  # one board's bug must not cost the others their summary line
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("node %d on %s: failed", spec.node_id, spec.port)
    finally:
        top.removeHandler(handler)
        handler.close()
    return BoardResult(
        port=spec.port,
        node_id=spec.node_id,
        status=status,
        error=error,
        deployed=deployed,
        seconds=time.monotonic() - started,
    )


def run_batch(
    manifest: Manifest,
    site_key: bytes,
    *,
    timeout_s: float = 10.0,
) -> BatchResult:
    """Deploy (unless the manifest says not to) and provision every board, one thread per port;
    a failing board is reported in its result and does not stop the others."""
    started = time.monotonic()
    try:
        manifest.log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(
            [ConfigProblem("log_dir", f"cannot create {manifest.log_dir}: {exc.strerror}")],
            str(manifest.path),
        ) from exc
    # device.py hides mpremote's chatter with contextlib.redirect_stdout, which swaps the
    # process-wide sys.stdout: threads entering it at once can leave a StringIO in its place.
    stdout = sys.stdout
    try:
        results = _run_all(manifest, site_key, timeout_s)
    finally:
        sys.stdout = stdout
    return BatchResult(results, time.monotonic() - started, manifest.log_dir)


def _run_all(manifest: Manifest, site_key: bytes, timeout_s: float) -> tuple[BoardResult, ...]:
    with (
        _board_logging(),
        concurrent.futures.ThreadPoolExecutor(
            max_workers=len(manifest.boards), thread_name_prefix="fogmesh-batch"
        ) as pool,
    ):
        futures = [
            pool.submit(_run_board, spec, manifest, site_key, timeout_s) for spec in manifest.boards
        ]
        return tuple(f.result() for f in futures)


# --- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest",
        required=True,
        type=Path,
        metavar="FILE",
        help="a TOML file: site_key_file, deploy, log_dir and one [[boards]] table per board",
    )
    p.add_argument(
        "--timeout-s",
        type=positive_seconds,
        default=10.0,
        help="how long a board may stay silent (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _refuse(exc: BatchError, as_json: bool) -> int:
    print(
        f"{PROG}: error: {exc.source or 'manifest'}: {len(exc.problems)} problem(s)",
        file=sys.stderr,
    )
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    if as_json:
        print_json({"ok": False, "error": str(exc), "problems": [str(p) for p in exc.problems]})
    return 2


def command_batch_provision(args: argparse.Namespace) -> int:
    """Exit 0 every board provisioned or unchanged, 1 any board failed, 2 a bad manifest or key."""
    try:
        manifest = load_manifest(Path(args.manifest))
        if manifest.site_key_file is None and not os.environ.get(SITE_KEY_ENV):
            raise BatchError(
                [
                    ConfigProblem(
                        "site_key_file",
                        f"missing: name the key file here or set {SITE_KEY_ENV} (hex)",
                    )
                ],
                str(manifest.path),
            )
        try:
            site_key = load_site_key(manifest.site_key_file, os.environ)
        except DeviceToolError as exc:
            raise BatchError(
                [ConfigProblem("site_key_file", str(exc))], str(manifest.path)
            ) from exc
        result = run_batch(manifest, site_key, timeout_s=args.timeout_s)
    except BatchError as exc:
        return _refuse(exc, args.json)
    if args.json:
        print_json(result.to_json())
    else:
        for b in result.boards:
            tail = f": {b.error}" if b.error else f" ({b.deployed} firmware files uploaded)"
            print(f"node {b.node_id} on {b.port}: {b.status} in {b.seconds:.1f} s{tail}")
        counts = {
            s: sum(b.status == s for b in result.boards)
            for s in ("provisioned", "unchanged", "failed")
        }
        print(
            f"{len(result.boards)} boards in {result.seconds:.1f} s: "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f"; logs in {result.log_dir}"
        )
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        PROG,
        "Deploy the firmware to and provision every board a TOML manifest lists, in parallel.",
        add_arguments,
        command_batch_provision,
    )


if __name__ == "__main__":
    sys.exit(main())
