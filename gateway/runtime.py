"""The running gateway: device services → bus → edge stage → durable queue → fog, plus the HTTP API,
safe writes with their audit log, and granular reload.

`Gateway` owns every task and resource of one run; `run_until_signal` is what
`fogmesh gateway run` calls (SIGHUP reloads the config file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from gateway.api import ApiServer
from gateway.audit import AuditLog
from gateway.bus import Bus
from gateway.config.fragments import DeviceBase
from gateway.config.loader import LoadedConfig, load_config
from gateway.config.models import GatewayConfig
from gateway.errors import ConfigError, FogmeshError
from gateway.metrics import Family
from gateway.model import KIND_RAW, KIND_STATUS, Counter, DeviceStatus, Health, Outgoing, Sample
from gateway.model import UplinkStats as UplinkStats
from gateway.reload import EdgeSet, ReloadRefused, diff_configs
from gateway.supervisor import DeviceService
from gateway.uplink import Uplink
from gateway.wire import Envelope, encode
from gateway.writes import Authenticator, WriteService
from retrofit_adapters.base import Adapter
from retrofit_adapters.registry import adapter_class

log = logging.getLogger("fogmesh.gateway")

_STOP_GRACE_S = 10.0  # longest wait for a cancelled device service to close its adapter
_TICK_S = 0.1  # how often windows and heartbeats are checked
_EDGE_BATCH = 5000  # samples taken from the bus in one go
AUDIT_FILE = "audit.db"  # in the data directory
RELOAD_RESULTS = ("ok", "invalid", "restart_required", "failed")


class GatewayFailed(FogmeshError):
    """A stage of the gateway itself failed (not a device): the gateway stops instead of idling."""


class Gateway:
    """One gateway run. Use `async with Gateway(...)` then `await gw.serve(stop_event)`."""

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        http_port: int | None = None,
        measure_raw_bytes: bool = False,
        clock: Callable[[], float] = time.time,
        adapter_factory: Callable[[DeviceBase], Adapter] | None = None,
        config_loader: Callable[[], LoadedConfig] | None = None,
    ) -> None:
        """`adapter_factory` makes a device's adapter (default: the registry's class for its
        type); `config_loader` is what a reload reads (default: the file `loaded` came from;
        none for a config that came from a string, which then cannot be reloaded).
        """
        self.loaded = loaded
        cfg: GatewayConfig = loaded.config
        self.site = cfg.gateway.site
        self.gateway_id = cfg.gateway.id
        self.started_ts = clock()
        self._clock = clock
        self._http_port = cfg.http.port if http_port is None else http_port
        self._measure_raw = measure_raw_bytes
        self._device_passwords = device_passwords(loaded)
        self._factory = adapter_factory or self._make_adapter
        path = loaded.path
        if config_loader is None and path is not None:
            config_loader = lambda: load_config(path)  # noqa: E731
        self._config_loader = config_loader
        self.bus = Bus()
        self.edge = EdgeSet(cfg, started=self.started_ts)
        self.uplink = Uplink(
            cfg.uplink,
            site=self.site,
            gateway_id=self.gateway_id,
            queue_path=loaded.queue_path,
            sink_url=loaded.sink_url,
            password=loaded.secret("uplink.mqtt.password"),
            clock=clock,
        )
        self.services: dict[str, DeviceService] = {}
        for dev in cast(list[DeviceBase], cfg.devices):
            if dev.enabled:
                self.services[dev.id] = self._service(dev)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.auth = Authenticator(loaded.http_tokens())
        self.audit = AuditLog(loaded.data_dir / AUDIT_FILE, clock=clock)
        self.writes = WriteService(
            auth=self.auth,
            audit=self.audit,
            lookup=lambda dev_id: self.services.get(dev_id),
            emit=lambda msg: self._submit([msg]),
        )
        self._reload_lock = asyncio.Lock()
        self._running = False  # devices may be started and stopped (by a reload)
        self.reloads: dict[str, int] = dict.fromkeys(RELOAD_RESULTS, 0)
        self.api: ApiServer | None = None
        self.samples_in = 0
        self.raw_equivalent_bytes = 0  # what forwarding every sample would have cost
        self.messages_submitted = 0
        self._raw_seq = 0
        self._pending_status: list[Outgoing] = []

    def _service(self, dev: DeviceBase) -> DeviceService:
        return DeviceService(
            dev,
            self._factory,
            self.bus.publish,
            on_health=self._on_health,
            clock=self._clock,
            phase_s=stagger_s(dev.id, dev.period_ms),
        )

    @property
    def device_tasks(self) -> Mapping[str, asyncio.Task[None]]:
        """The task of each running device service, by device id."""
        return dict(self._tasks)

    # --- GatewayView -------------------------------------------------------------------

    def device_statuses(self) -> list[DeviceStatus]:
        return [svc.status for svc in self.services.values()]

    def metric_families(self) -> list[Family]:
        writes = tuple(
            ((("device", dev), ("result", result)), float(n))
            for (dev, result), n in sorted(self.writes.counts().items())
        )
        reloads = tuple(((("result", r),), float(n)) for r, n in self.reloads.items())
        return [
            Family(
                "fogmesh_writes_total",
                "Tag writes answered, by device and result (ok, refused, forbidden, invalid, ...).",
                "counter",
                writes,
            ),
            Family(
                "fogmesh_reloads_total",
                "Config reloads, by result (ok, invalid, restart_required, failed).",
                "counter",
                reloads,
            ),
        ]

    def uplink_stats(self) -> UplinkStats:
        return self.uplink.stats()

    def counters(self) -> list[Counter]:
        b = self.bus.stats
        e = self.edge.stats()
        out = [
            Counter(
                "fogmesh_bus_published_samples_total",
                "Samples put on the bus by devices.",
                "counter",
                b.published,
            ),
            Counter(
                "fogmesh_bus_dropped_samples_total",
                "Samples dropped because the bus stayed full.",
                "counter",
                b.dropped_samples,
            ),
            Counter(
                "fogmesh_bus_depth_samples", "Samples waiting on the bus.", "gauge", b.depth_samples
            ),
            Counter(
                "fogmesh_edge_samples_total",
                "Samples the edge stage processed.",
                "counter",
                e.samples_in,
            ),
            Counter(
                "fogmesh_edge_summaries_total",
                "Summary messages produced.",
                "counter",
                e.summaries_out,
            ),
            Counter(
                "fogmesh_edge_events_total", "Event messages produced.", "counter", e.events_out
            ),
            Counter(
                "fogmesh_edge_raw_total",
                "Raw (report-by-exception) messages produced.",
                "counter",
                e.raw_out,
            ),
            Counter(
                "fogmesh_edge_samples_bad_total",
                "Samples of bad quality (kept out of statistics).",
                "counter",
                e.samples_bad,
            ),
            Counter(
                "fogmesh_edge_samples_late_total",
                "Samples that arrived after their window closed.",
                "counter",
                e.samples_late,
            ),
            Counter(
                "fogmesh_edge_unknown_tag_samples_total",
                "Samples of devices or tags the config does not know.",
                "counter",
                e.unknown_tag_samples,
            ),
            Counter(
                "fogmesh_gateway_messages_submitted_total",
                "Messages handed to the durable queue.",
                "counter",
                self.messages_submitted,
            ),
        ]
        if self._measure_raw:
            out.append(
                Counter(
                    "fogmesh_edge_raw_equivalent_bytes_total",
                    "Bytes forwarding every sample raw would have cost.",
                    "counter",
                    self.raw_equivalent_bytes,
                )
            )
        return out

    # --- lifecycle ---------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in order and flush what is queued."""
        cfg = self.loaded.config
        async with self.uplink, contextlib.AsyncExitStack() as stack:
            # Opened before the API and closed after it: every answered write is on record.
            recovered = await asyncio.to_thread(self.audit.open)
            stack.push_async_callback(asyncio.to_thread, self.audit.close)
            self.writes.emit_recovered(recovered)
            if cfg.http.enabled:
                self.api = await stack.enter_async_context(
                    ApiServer(self, cfg.http.host, self._http_port, control=self)
                )
                host, port = self.api.address
                log.info("HTTP API on http://%s:%d/api/v1/health", host, port)
                if not self.auth.enabled:
                    log.info("writes and reloads over HTTP are disabled: no [http] token")
            edge_task = asyncio.create_task(self._edge_loop(), name="edge")
            tick_task = asyncio.create_task(self._tick_loop(), name="tick")
            for dev_id in self.services:
                self._start(dev_id)
            self._running = True
            log.info(
                "gateway %s/%s running: %d devices, uplink %s",
                self.site,
                self.gateway_id,
                len(self._tasks),
                self.uplink.stats().url,
            )
            stopped = asyncio.create_task(stop.wait(), name="stop")
            failed: BaseException | None = None
            try:
                # The edge and tick tasks never end on their own: if one does, it failed, and a
                # gateway that polls but forwards nothing must not go on quietly.
                await asyncio.wait(
                    {stopped, edge_task, tick_task}, return_when=asyncio.FIRST_COMPLETED
                )
                for t in (edge_task, tick_task):
                    if t.done() and not t.cancelled():
                        failed = t.exception() or RuntimeError(f"{t.get_name()} task ended")
                        log.error(
                            "gateway stage %r failed; stopping", t.get_name(), exc_info=failed
                        )
            finally:
                stopped.cancel()
                # Devices first, so nothing new arrives; then everything on the bus is processed,
                # partial windows are flushed and the uplink sends what it can. A reload under
                # way finishes first, so it cannot start devices behind the shutdown's back.
                async with self._reload_lock:
                    self._running = False
                    await self._stop(list(self._tasks))
                tick_task.cancel()
                edge_task.cancel()
                await asyncio.gather(tick_task, edge_task, stopped, return_exceptions=True)
                if failed is None:
                    self._drain_bus()
                    self._submit(self.edge.flush(self._clock()))
                    self._flush_status()
                log.info(
                    "gateway stopping: flushing %d queued messages", self.uplink.stats().queue_depth
                )
            if failed is not None:
                raise GatewayFailed(f"gateway stopped: {failed}") from failed

    def _start(self, dev_id: str) -> None:
        svc = self.services[dev_id]
        self._tasks[dev_id] = asyncio.create_task(svc.run(), name=f"device:{dev_id}")

    async def _stop(self, dev_ids: Sequence[str]) -> None:
        tasks = [self._tasks.pop(d) for d in dev_ids if d in self._tasks]
        for t in tasks:
            t.cancel()
        if not tasks:
            return
        # Each service closes its adapter within its timeout_ms on the way out; one that does
        # not must never hold up a shutdown or a reload, so it is abandoned with an error.
        _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE_S)
        if pending:
            log.error(
                "devices did not stop within %.0f s and were abandoned: %s",
                _STOP_GRACE_S,
                ", ".join(sorted(t.get_name() for t in pending)),
            )

    # --- reload ------------------------------------------------------------------------

    async def reload(self, who: str = "api") -> dict[str, Any]:
        """Re-read the config and apply it device by device; ReloadRefused if nothing changed.

        Checked in full first (structure, secrets, references, and that every new or changed
        device's adapter can be made): on any problem nothing changes. Settings only a restart
        can apply ([gateway], [uplink], [http] other than tokens) refuse the whole reload.
        Otherwise removed and changed devices stop, their samples still on the bus go through
        the edge stage, the edge stage is rebuilt where its config changed, and added and
        changed devices start; unchanged devices and the uplink are never touched.
        """
        loader = self._config_loader
        if loader is None:
            raise ReloadRefused(409, "nothing to reload: the config did not come from a file")
        async with self._reload_lock:
            if not self._running:
                raise ReloadRefused(503, "the gateway is not running")
            try:
                new = await asyncio.to_thread(loader)
            except ConfigError as exc:
                self._reloaded("invalid")
                problems = [str(p) for p in exc.problems]
                log.error("reload by %s refused, nothing changed: %s", who, "; ".join(problems))
                raise ReloadRefused(
                    422,
                    f"invalid config, nothing changed: {len(problems)} problem(s)",
                    problems=problems,
                ) from exc
            except FogmeshError as exc:
                self._reloaded("failed")
                raise ReloadRefused(
                    422, f"config not reloaded: {exc}", problems=[str(exc)]
                ) from exc
            old = self.loaded
            diff = diff_configs(
                old.config, new.config, old_secrets=old.secrets, new_secrets=new.secrets
            )
            if diff.restart_required:
                self._reloaded("restart_required")
                keys = ", ".join(diff.restart_required)
                log.error(
                    "reload by %s refused, nothing changed: restart required for: %s", who, keys
                )
                raise ReloadRefused(
                    409,
                    f"restart required for: {keys}; nothing changed",
                    restart_required=diff.restart_required,
                )
            old_passwords, self._device_passwords = self._device_passwords, device_passwords(new)
            problems = self._check_adapters(new.config, {*diff.added, *diff.changed})
            if problems:
                self._device_passwords = old_passwords
                self._reloaded("invalid")
                log.error("reload by %s refused, nothing changed: %s", who, "; ".join(problems))
                raise ReloadRefused(
                    422,
                    f"invalid config, nothing changed: {len(problems)} problem(s)",
                    problems=problems,
                )

            await self._stop(diff.restart)
            # The stopped devices' last samples go through the stages they were read for.
            self._drain_bus()
            flushed, rebuilt = self.edge.reconfigure(new.config, self._clock())
            self._submit(flushed)
            self._flush_status()
            services: dict[str, DeviceService] = {}
            for dev in cast(list[DeviceBase], new.config.devices):
                if not dev.enabled:
                    continue
                keep = dev.id in diff.unchanged
                services[dev.id] = self.services[dev.id] if keep else self._service(dev)
            self.services = services  # in the new config's order, as the API lists them
            for dev_id in (*diff.added, *diff.changed):
                self._start(dev_id)
            if diff.tokens_changed:
                self.auth.replace(new.http_tokens())
            self.loaded = new
            self._reloaded("ok")
            report: dict[str, Any] = {
                "added": list(diff.added),
                "removed": list(diff.removed),
                "restarted": list(diff.changed),
                "unchanged": list(diff.unchanged),
                "rules": {
                    "added": list(diff.rules_added),
                    "removed": list(diff.rules_removed),
                    "changed": list(diff.rules_changed),
                },
                "windows_rebuilt": rebuilt,
            }
            log.info(
                "reload by %s: added %s, removed %s, restarted %s, %d unchanged; rules +%d -%d ~%d",
                who,
                list(diff.added),
                list(diff.removed),
                list(diff.changed),
                len(diff.unchanged),
                len(diff.rules_added),
                len(diff.rules_removed),
                len(diff.rules_changed),
            )
            return report

    def _reloaded(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    def _make_adapter(self, dev: DeviceBase) -> Adapter:
        """The registry's adapter for the device's type, given the device's resolved password."""
        cls = adapter_class(getattr(dev, "type"))  # noqa: B009 - each device model's discriminator
        password = self._device_passwords.get(dev.id)
        if password is None:
            return cls(dev)
        return cls(dev, password=password)  # type: ignore[call-arg]  # adapters that take one

    def _check_adapters(self, cfg: GatewayConfig, dev_ids: set[str]) -> list[str]:
        # Making an adapter does no I/O (the adapter contract), so it is a cheap, complete check
        # that the type is known, its vendor library loads and the adapter accepts the config.
        problems: list[str] = []
        for i, dev in enumerate(cast(list[DeviceBase], cfg.devices)):
            if dev.id not in dev_ids:
                continue
            try:
                self._factory(dev)
            except Exception as exc:
                problems.append(f"devices[{i}]: cannot make the adapter: {exc}")
        return problems

    async def _edge_loop(self) -> None:
        while True:
            batch = await self.bus.get()
            more = self.bus.get_nowait_many(_EDGE_BATCH)
            if more:
                batch = batch + more
            self._process(batch)

    def _drain_bus(self) -> None:
        while True:
            batch = self.bus.get_nowait_many(_EDGE_BATCH)
            if not batch:
                return
            self._process(batch)

    def _process(self, batch: Sequence[Sample]) -> None:
        self.samples_in += len(batch)
        if self._measure_raw:
            self.raw_equivalent_bytes += sum(self._raw_size(s) for s in batch)
        self._submit(self.edge.process(batch))
        self._flush_status()

    def _raw_size(self, s: Sample) -> int:
        self._raw_seq += 1
        data = {"tag": s.tag, "value": s.value, "quality": str(s.quality)}
        env = Envelope(
            site=self.site,
            gateway=self.gateway_id,
            device=s.device,
            kind=KIND_RAW,
            seq=self._raw_seq,
            ts_ms=int(s.ts * 1000),
            historical=False,
            data=data,
        )
        return len(encode(env))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            self._submit(self.edge.tick(self._clock()))
            self._flush_status()

    def _submit(self, msgs: list[Outgoing]) -> None:
        if msgs:
            self.uplink.submit(msgs)
            self.messages_submitted += len(msgs)

    def _on_health(self, status: DeviceStatus, old: Health) -> None:
        # Health changes travel upstream as status messages, so the fog sees a device go down.
        log.log(
            logging.WARNING if status.health in (Health.DOWN, Health.DEGRADED) else logging.INFO,
            "device %s: %s -> %s%s",
            status.id,
            old,
            status.health,
            f" ({status.last_error})" if status.last_error else "",
        )
        self._pending_status.append(
            Outgoing(
                device=status.id,
                kind=KIND_STATUS,
                ts_ms=int(self._clock() * 1000),
                data={
                    "health": str(status.health),
                    "previous": str(old),
                    "error": status.last_error,
                },
            )
        )

    def _flush_status(self) -> None:
        if self._pending_status:
            pending, self._pending_status = self._pending_status, []
            self._submit(pending)


def stagger_s(device_id: str, period_ms: int) -> float:
    """A stable offset in [0, period) from the device id: first polls spread across the period."""
    return (zlib.crc32(device_id.encode()) % 1000) / 1000.0 * period_ms / 1000.0


def device_passwords(loaded: LoadedConfig) -> dict[str, str]:
    """Resolved `password` secrets of the devices, by device id (the loader keys them by index)."""
    out: dict[str, str] = {}
    for i, dev in enumerate(cast(list[DeviceBase], loaded.config.devices)):
        pw = loaded.secret(f"devices[{i}].password")
        if pw is not None:
            out[dev.id] = pw
    return out


async def _reload_and_log(gw: Gateway, who: str) -> None:
    try:
        await gw.reload(who)
    except ReloadRefused as exc:
        log.error("reload (%s) refused: %s", who, exc.message)
        for problem in exc.problems:
            log.error("  %s", problem)
    except Exception:
        log.exception("reload (%s) failed", who)


async def run_until_signal(loaded: LoadedConfig) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut down gracefully; SIGHUP reloads."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    gw = Gateway(loaded)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(_reload_and_log(gw, "SIGHUP"), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    signals = [signal.SIGINT, signal.SIGTERM]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    hup = getattr(signal, "SIGHUP", None)  # POSIX only
    if hup is not None:
        loop.add_signal_handler(hup, on_hup)
        signals.append(hup)
    try:
        await gw.serve(stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
