"""The running gateway: device services → bus → edge stage → durable queue → fog, plus the HTTP API.

`Gateway` owns every task and resource of one run; `run_until_signal` is what
`fogmesh gateway run` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence

from gateway.api import ApiServer
from gateway.bus import Bus
from gateway.config.fragments import DeviceBase
from gateway.config.loader import LoadedConfig
from gateway.config.models import GatewayConfig
from gateway.edge import EdgeStage
from gateway.errors import FogmeshError
from gateway.model import KIND_RAW, KIND_STATUS, Counter, DeviceStatus, Health, Outgoing, Sample
from gateway.model import UplinkStats as UplinkStats
from gateway.supervisor import DeviceService
from gateway.uplink import Uplink
from gateway.wire import Envelope, encode
from retrofit_adapters.base import Adapter
from retrofit_adapters.registry import adapter_class

log = logging.getLogger("fogmesh.gateway")

_TICK_S = 0.1  # how often windows and heartbeats are checked
_EDGE_BATCH = 5000  # samples taken from the bus in one go


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
    ) -> None:
        self.loaded = loaded
        cfg: GatewayConfig = loaded.config
        self.site = cfg.gateway.site
        self.gateway_id = cfg.gateway.id
        self.started_ts = clock()
        self._clock = clock
        self._http_port = cfg.http.port if http_port is None else http_port
        self._measure_raw = measure_raw_bytes
        self.bus = Bus()
        self.edge = EdgeStage(cfg, grace_s=cfg.edge.grace_s, started=self.started_ts)
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
        for dev in cfg.devices:
            if not dev.enabled:
                continue
            self.services[dev.id] = DeviceService(
                dev,
                _adapter_factory,
                self.bus.publish,
                on_health=self._on_health,
                clock=clock,
            )
        self.api: ApiServer | None = None
        self.samples_in = 0
        self.raw_equivalent_bytes = 0  # what forwarding every sample would have cost
        self.messages_submitted = 0
        self._raw_seq = 0
        self._pending_status: list[Outgoing] = []

    # --- GatewayView -------------------------------------------------------------------

    def device_statuses(self) -> list[DeviceStatus]:
        return [svc.status for svc in self.services.values()]

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
            if cfg.http.enabled:
                self.api = await stack.enter_async_context(
                    ApiServer(self, cfg.http.host, self._http_port)
                )
                host, port = self.api.address
                log.info("HTTP API on http://%s:%d/api/v1/health", host, port)
            edge_task = asyncio.create_task(self._edge_loop(), name="edge")
            tick_task = asyncio.create_task(self._tick_loop(), name="tick")
            device_tasks = [
                asyncio.create_task(svc.run(), name=f"device:{dev_id}")
                for dev_id, svc in self.services.items()
            ]
            log.info(
                "gateway %s/%s running: %d devices, uplink %s",
                self.site,
                self.gateway_id,
                len(device_tasks),
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
                # partial windows are flushed and the uplink sends what it can.
                for t in device_tasks:
                    t.cancel()
                await asyncio.gather(*device_tasks, return_exceptions=True)
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


def _adapter_factory(cfg: DeviceBase) -> Adapter:
    return adapter_class(getattr(cfg, "type"))(cfg)  # noqa: B009 - `type` is each adapter model's discriminator


async def run_until_signal(loaded: LoadedConfig) -> None:
    """Run a gateway until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Gateway(loaded).serve(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
