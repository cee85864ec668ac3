"""Device services: each configured device is polled at a fixed rate through its adapter, with
timeouts, backoff with jitter, a circuit breaker and a health state, so that a device that
raises, hangs or returns garbage never blocks or crashes the others; writes go through the same
service, one at a time with the polls. Semantics: docs/adapters.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config.fragments import DeviceBase
from gateway.errors import BadData, DeviceError, DeviceTimeout, FogmeshError
from gateway.model import DeviceStatus, Health, Quality, Sample, Value
from retrofit_adapters.base import CAP_WRITE, Adapter, Reading

log = logging.getLogger("fogmesh.supervisor")

_T = TypeVar("_T")
_MAX_DOUBLINGS = 62  # beyond this the doubling only burns big-int arithmetic; the cap rules anyway


class DeviceUnavailable(DeviceError):
    """A write found the device stopped, not connected, or behind an open circuit breaker."""


class WriteNotSupported(DeviceError):
    """A write to a device whose adapter does not declare the "write" capability."""


class DeviceService:
    """One device as a service: `await run()` until cancelled; `status` is live.

    `clock` (wall time) stamps samples and errors; `monotonic` drives the schedule, backoff,
    breaker and degraded window; `sleep` waits on that clock (tests pass a virtual one).
    Timeouts of open/read/close use the event loop's own clock.
    """

    def __init__(
        self,
        cfg: DeviceBase,
        adapter_factory: Callable[[DeviceBase], Adapter],
        publish: Callable[[list[Sample]], Awaitable[bool]],
        *,
        on_health: Callable[[DeviceStatus, Health], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        phase_s: float = 0.0,
    ) -> None:
        self.cfg = cfg
        # Delay of the first poll after each (re)connect. The runtime staggers devices across
        # their period, so hundreds of devices don't all poll in the same instant (a burst
        # that queues requests and inflates latency while the average load is low).
        self._phase_s = phase_s
        self._factory = adapter_factory
        self._publish = publish
        self._on_health = on_health
        self._clock = clock
        self._mono = monotonic
        # Own generator per device by default, so that devices failing together spread out.
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        # Every device model has a `type` literal (the union's discriminator); DeviceBase does not.
        self.status = DeviceStatus(id=cfg.id, type=str(getattr(cfg, "type", "")))
        self._adapter: Adapter | None = None
        self._known_tags: frozenset[str] | None = None
        self._needs_close = False
        self._ever_opened = False
        self._ever_read = False
        self._breaker_until: float | None = None  # monotonic; not None while the breaker is open
        self._retry_at: float | None = None  # monotonic; when the backoff ends
        self._last_problem: float | None = None  # monotonic time of the last error or bad data
        # Reads, writes and close take turns on the adapter: a write never interleaves with a
        # poll of the same device (one request at a time on the device's connection).
        self._io = asyncio.Lock()
        self._ready = False  # the adapter is open and has not failed since
        self._stopped = False
        self._changed = asyncio.Event()  # replaced and set whenever ready/stopped/breaker change

    @property
    def skipped_polls_total(self) -> int:
        return self.status.skipped_polls_total

    @property
    def breaker_open(self) -> bool:
        return self._breaker_until is not None

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def run(self) -> None:
        """Poll until cancelled. Never raises anything but CancelledError; closes the adapter."""
        try:
            while True:
                await self._wait_for_attempt()
                try:
                    await self._connect()
                    await self._poll_forever()
                except Exception as exc:
                    # Any exception, the adapter's bugs included: the device fails, not the gateway.
                    await self._failed(exc)
        finally:
            self._stopped = True
            self._signal()
            await self._close()

    async def write(self, tag: str, value: Value) -> None:
        """Write one tag through the adapter, in turn with the polls of this device.

        Waits up to `timeout_ms` for the adapter to be open, then for the poll under way to end;
        the adapter's write is bounded by `timeout_ms` too. Raises DeviceUnavailable (stopped,
        not connected, breaker open), WriteNotSupported, DeviceTimeout, or DeviceError for
        anything the adapter raised (a bug shows as `unexpected <Type>: ...`). A write never
        counts as a failed poll and never touches health or `last_values`: the next poll reads
        what the device really holds.
        """
        dev = self.cfg.id
        timeout_s = self.cfg.timeout_ms / 1000.0
        try:
            async with asyncio.timeout(timeout_s):
                while not self._ready:
                    self._check_available()
                    changed = self._changed
                    await changed.wait()
        except TimeoutError:
            last = self.status.last_error
            raise DeviceUnavailable(
                f"device {dev!r} is not connected" + (f" ({last})" if last else "")
            ) from None
        async with self._io:
            adapter = self._adapter
            self._check_available()
            if adapter is None or not self._ready:
                raise DeviceUnavailable(f"device {dev!r} lost its connection")
            if CAP_WRITE not in adapter.capabilities:
                raise WriteNotSupported(f"device type {self.status.type!r} does not support writes")
            try:
                await self._bounded("write", lambda: adapter.write(tag, value))
            except FogmeshError:
                raise
            except Exception as exc:
                log.warning("device %s: write of %r failed", dev, tag, exc_info=exc)
                raise DeviceError(_describe(exc)) from exc

    def _check_available(self) -> None:
        dev = self.cfg.id
        if self._stopped:
            raise DeviceUnavailable(f"device {dev!r} is stopped")
        if self._breaker_until is not None:
            last = self.status.last_error
            raise DeviceUnavailable(
                f"device {dev!r} is down (circuit breaker open)" + (f": {last}" if last else "")
            )

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- the loop ----------------------------------------------------------------------

    async def _wait_for_attempt(self) -> None:
        if self._breaker_until is not None:
            await self._sleep_until(self._breaker_until)  # then one half-open trial
        elif self._retry_at is not None:
            await self._sleep_until(self._retry_at)
        self._retry_at = None

    async def _connect(self) -> None:
        if self._adapter is None:
            # Made once and reused across reconnects, so adapter state (a simulated process's
            # start time, a learned register layout) survives a dropped connection.
            adapter = self._factory(self.cfg)
            tags = adapter.tag_names()
            self._adapter = adapter
            self._known_tags = None if tags is None else frozenset(tags)
        self._needs_close = True  # a failed open may have left half a connection behind
        await self._bounded("open", self._adapter.open)
        if self._ever_opened:
            self.status.reconnects_total += 1
        self._ever_opened = True
        if self._breaker_until is None:
            # A half-open trial is not ready for writes until its read has closed the breaker.
            self._ready = True
            self._signal()

    async def _poll_forever(self) -> None:
        period = self.cfg.period_ms / 1000.0
        deadline = self._mono() + self._phase_s
        while True:
            await self._sleep_until(deadline)
            await self._poll_once()
            # Fixed rate: deadlines are a grid from the first poll, so durations never add up
            # to drift; deadlines already past are skipped, not made up in a burst.
            deadline += period
            now = self._mono()
            if now > deadline:
                missed = int((now - deadline) // period) + 1
                deadline += missed * period
                self.status.skipped_polls_total += missed

    async def _poll_once(self) -> None:
        adapter = self._adapter
        assert adapter is not None  # _connect ran
        async with self._io:
            started = self._mono()
            result = await self._bounded("read", adapter.read)
            elapsed = self._mono() - started
        now_ts = self._clock()
        samples, problems = self._check(result, now_ts)
        if problems:
            self.status.bad_data_total += len(problems)
            summary = problems[0]
            if len(problems) > 1:
                summary += f" (and {len(problems) - 1} more)"
            if not samples:
                raise BadData(summary)
            self._record_problem(summary)
            log.debug("device %s: %s", self.cfg.id, summary)
        st = self.status
        st.polls_total += 1
        st.poll_latency.observe(elapsed)
        st.last_success_ts = now_ts
        st.consecutive_failures = 0
        for s in samples:
            st.last_values[s.tag] = s
        self._ever_read = True
        if self._breaker_until is not None:
            log.info("device %s: half-open trial succeeded, breaker closed", self.cfg.id)
            self._breaker_until = None
            self._ready = True
            self._signal()
        self._update_health()
        if samples:
            await self._publish_batch(samples)

    async def _failed(self, exc: Exception) -> None:
        self._ready = False
        st = self.status
        st.errors_total += 1
        st.consecutive_failures += 1
        message = _describe(exc)
        self._record_problem(message)
        sup = self.cfg.supervisor
        n = st.consecutive_failures
        now = self._mono()
        bug = not isinstance(exc, FogmeshError)
        if n >= sup.breaker_failures:
            reopened = self._breaker_until is not None
            self._breaker_until = now + sup.breaker_cooldown_s
            log.warning(
                "device %s: %s; breaker %s for %.1f s after %d consecutive failures",
                self.cfg.id,
                message,
                "re-opened" if reopened else "open",
                sup.breaker_cooldown_s,
                n,
                exc_info=exc if bug else None,
            )
        else:
            delay = self._backoff_s(n)
            self._retry_at = now + delay
            # The first failure of a streak is news; its repeats would flood the log.
            level = logging.WARNING if n == 1 else logging.DEBUG
            log.log(
                level,
                "device %s: %s; retry in %.3f s",
                self.cfg.id,
                message,
                delay,
                exc_info=exc if bug and n == 1 else None,
            )
        self._update_health()
        self._signal()
        await self._close()

    def _backoff_s(self, failures: int) -> float:
        sup = self.cfg.supervisor
        doubled = sup.backoff_initial_ms << min(failures - 1, _MAX_DOUBLINGS)
        base_s = min(doubled, sup.backoff_max_ms) / 1000.0
        return base_s * (1.0 + sup.jitter * self._rng.uniform(-1.0, 1.0))

    # --- helpers -----------------------------------------------------------------------

    async def _sleep_until(self, when: float) -> None:
        # Always awaits, even for 0: a device whose adapter never suspends must still yield.
        await self._sleep(max(0.0, when - self._mono()))

    async def _bounded(self, what: str, op: Callable[[], Awaitable[_T]]) -> _T:
        limit = asyncio.timeout(self.cfg.timeout_ms / 1000.0)
        try:
            async with limit:
                return await op()
        except TimeoutError as exc:
            if limit.expired():
                raise DeviceTimeout(
                    f"timeout: {what} took more than {self.cfg.timeout_ms} ms"
                ) from exc
            raise  # the adapter's own TimeoutError: an unmapped vendor error, not ours
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Nobody cancelled this service: a cancellation escaped from inside the adapter.
                raise DeviceError(f"{what} was cancelled inside the adapter") from None
            raise

    async def _close(self) -> None:
        self._ready = False
        if self._adapter is None or not self._needs_close:
            return
        self._needs_close = False
        try:
            async with self._io:  # a write under way finishes (bounded) before the close
                await self._bounded("close", self._adapter.close)
        except Exception as exc:
            # Nothing more to do with a connection that will not close; the next open starts over.
            log.warning(
                "device %s: close failed: %s",
                self.cfg.id,
                _describe(exc),
                exc_info=exc if not isinstance(exc, FogmeshError) else None,
            )

    async def _publish_batch(self, samples: list[Sample]) -> None:
        try:
            await self._publish(samples)  # False (dropped) is counted by the bus
        except Exception:
            # The bus is not the device's fault: keep the connection and keep polling.
            log.exception("device %s: publishing %d samples failed", self.cfg.id, len(samples))

    def _record_problem(self, message: str) -> None:
        self.status.last_error = message
        self.status.last_error_ts = self._clock()
        self._last_problem = self._mono()

    def _evaluate_health(self) -> Health:
        if self._breaker_until is not None:
            return Health.DOWN
        if not self._ever_read:
            return Health.STARTING
        window = self.cfg.supervisor.degraded_window_s
        if self._last_problem is not None and self._mono() - self._last_problem < window:
            return Health.DEGRADED
        return Health.OK

    def _update_health(self) -> None:
        new = self._evaluate_health()
        old = self.status.health
        if new is old:
            return
        self.status.health = new
        log.debug("device %s: health %s -> %s", self.cfg.id, old, new)
        if self._on_health is not None:
            try:
                self._on_health(self.status, old)
            except Exception:
                log.exception("device %s: on_health callback failed", self.cfg.id)

    def _check(self, result: object, now_ts: float) -> tuple[list[Sample], list[str]]:
        """Split a read's result into samples to publish and descriptions of what was dropped."""
        if not isinstance(result, list):
            return [], [f"bad data: read returned {type(result).__name__}, not a list of Reading"]
        samples: list[Sample] = []
        problems: list[str] = []
        for i, r in enumerate(result):
            problem = _problem(r, i, self._known_tags)
            if problem is not None:
                problems.append(problem)
                continue
            ts = now_ts if r.ts is None else float(r.ts)
            samples.append(Sample(self.cfg.id, r.tag, r.value, r.quality, ts))
        return samples, problems


def _problem(r: object, index: int, known: frozenset[str] | None) -> str | None:
    """What is wrong with one item of a read, or None when it is a usable Reading."""
    if not isinstance(r, Reading):
        return f"bad data: item {index} is a {type(r).__name__}, not a Reading"
    tag = r.tag
    if not isinstance(tag, str):
        return f"bad data: item {index} has tag {tag!r}, not a string"
    if known is not None and tag not in known:
        return f"bad data: unknown tag {tag!r}"
    v = r.value
    if not isinstance(v, bool | int | float | str):
        return f"bad data: tag {tag!r} value of unsupported type {type(v).__name__}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"bad data: tag {tag!r} value {v!r}"
    if not isinstance(r.quality, Quality):
        return f"bad data: tag {tag!r} quality {r.quality!r}"
    ts = r.ts
    if ts is not None and (
        isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts)
    ):
        return f"bad data: tag {tag!r} timestamp {ts!r}"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FogmeshError):
        return str(exc) or type(exc).__name__
    # Not mapped to a project error: an adapter bug or an unmapped vendor exception.
    return f"unexpected {type(exc).__name__}: {exc}"
