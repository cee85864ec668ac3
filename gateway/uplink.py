"""Store-and-forward to the fog: every message is committed to the durable queue, sent, and deleted
only when the sink acknowledges it. Live data goes first; the backlog drains at a bounded rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from gateway import wire
from gateway.config.models import UplinkSection
from gateway.errors import StoreError, UplinkError
from gateway.model import Outgoing, UplinkStats
from gateway.queue import DISK_FULL, DurableQueue, Queued
from gateway.sinks import OutMessage, Sink, make_sink

__all__ = ["Uplink"]

log = logging.getLogger("fogmesh.uplink")

_HOUSEKEEP_S = 1.0  # expiry and gap declarations
_EXPIRE_CHUNK = 5000  # rows per expiry transaction, so a long outage never stalls the loop
_LIVE_CACHE_MAX = 10_000  # live messages kept in memory for sending; beyond, they are read back
_FETCH_MAX = 1000
_BURST_S = 0.1  # the backlog token bucket holds this many seconds of drain rate
_STABLE_S = 10.0  # a connection that lasted this long resets the reconnect backoff
_CLOSE_TIMEOUT_S = 2.0


class Uplink:
    """The durable queue plus one fog sink, with the task that moves messages between them."""

    def __init__(
        self,
        cfg: UplinkSection,
        *,
        site: str,
        gateway_id: str,
        queue_path: Path,
        sink_url: str,
        password: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.site = site
        self.gateway_id = gateway_id
        self._clock = clock
        self.queue = DurableQueue(
            Path(queue_path), cfg.queue, site=site, gateway_id=gateway_id, clock=clock
        )
        self.sink: Sink = make_sink(
            sink_url, self, site=site, gateway_id=gateway_id, mqtt=cfg.mqtt, password=password
        )
        self._stats = UplinkStats(url=self.sink.safe_url)
        self._open = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._topics: dict[tuple[str, str], str] = {}
        # Backlog (sent with historical = true) is what an outage or a restart delayed: rows left
        # from the previous run, and rows submitted after a failed connect or a lost connection.
        # Rows submitted while the first attempt is still under way are live.
        self._backlog_upto = 0
        self._outage = False
        # per connection
        self._connected = False
        self._lost: str | None = None
        self._boundary = 0  # last seq at connect: at or below is backlog (historical)
        self._backlog_cursor = 0  # highest backlog seq handed to the sink
        self._live_cursor = 0  # highest live seq handed to the sink
        self._cache: deque[Queued] = deque()  # live messages not yet sent, contiguous
        self._spill = False  # live messages exist only in SQLite (cache was full)
        self._inflight: dict[int, bool] = {}  # seq -> is backlog
        self._backlog_inflight = 0
        self._acked: list[int] = []  # acknowledged, not yet deleted
        self._acks_this_connection = 0
        self._rate = float(cfg.drain_rate_msgs_per_s)
        self._burst = max(1.0, self._rate * _BURST_S)
        self._tokens = 0.0
        self._tokens_ts = 0.0

    # ---- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Uplink:
        await asyncio.to_thread(self.queue.open)
        self._open = True
        self._backlog_upto = self.queue.last_seq
        self._outage = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        if self.queue.depth == 0:
            self._drained.set()
        self._tasks = [
            asyncio.create_task(self._run(), name="fogmesh-uplink-sender"),
            asyncio.create_task(self._housekeep(), name="fogmesh-uplink-housekeeping"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.cfg.flush_timeout_s > 0 and self._connected:
                await self.wait_drained(self.cfg.flush_timeout_s)
        finally:
            self._stopping = True
            self._wake.set()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await self.sink.close()
            self._set_disconnected()
            with contextlib.suppress(StoreError):
                self._flush_acks()
            self.stats()  # keep the final figures readable after close
            self._open = False
            # The closing checkpoint folds the WAL into the file (an fsync): not on the loop.
            await asyncio.to_thread(self.queue.close)
            self._drained.set()

    # ---- the runtime's side ----------------------------------------------------------------

    def submit(self, msgs: Sequence[Outgoing]) -> list[int]:
        """Commit messages to the queue; returns their seqs. Full-policy refusals are counted."""
        if not self._open:
            raise StoreError("the uplink is not open")
        before = self.queue.drops.get(DISK_FULL, 0)
        rows = self.queue.put(msgs)
        if self.queue.drops.get(DISK_FULL, 0) != before:
            self._stats.last_error = f"queue {self.queue.path}: disk full, messages refused"
        if rows:
            self._drained.clear()
            if self._connected:
                self._add_live(rows)
                self._wake.set()
        return [q.seq for q in rows]

    def stats(self) -> UplinkStats:
        s = self._stats
        s.connected = self._connected
        if self.queue.is_open:
            s.queue_depth = self.queue.depth
            s.queue_bytes = self.queue.nbytes
            s.backlog = self.queue.backlog
            s.last_seq = self.queue.last_seq
            s.drops = self.queue.drops
        return dataclasses.replace(s, drops=dict(s.drops))

    async def wait_drained(self, timeout_s: float) -> bool:
        """True once every queued message is acknowledged (and deleted); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.queue.is_open and self.queue.depth > 0:
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            return False
        return not self.queue.is_open or self.queue.depth == 0

    # ---- the sink's side (SinkListener; called on the loop) ---------------------------------

    def sink_acked(self, seqs: list[int]) -> None:
        inflight = self._inflight
        for seq in seqs:
            if inflight.pop(seq, False):
                self._backlog_inflight -= 1
        self._acked.extend(seqs)
        self._acks_this_connection += len(seqs)
        self._stats.acked_total += len(seqs)
        self._stats.last_ack_ts = self._clock()
        self._wake.set()

    def sink_refused(self, seqs: list[int], reason: str) -> None:
        for seq in seqs:
            if self._inflight.pop(seq, False):
                self._backlog_inflight -= 1
        # Not acknowledged, so kept; reconnect with backoff rather than hammer the broker.
        self._lost = f"fog refused seq {min(seqs)}..{max(seqs)}: {reason}"
        self._wake.set()

    def sink_lost(self, reason: str) -> None:
        if self._lost is None:  # keep the first cause (a refusal often precedes the drop)
            self._lost = reason
        self._wake.set()

    # ---- sender ------------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        connected_once = False
        while not self._stopping:
            self._lost = None
            try:
                await self.sink.connect()
            # UplinkError is expected; anything else is a bug, but must not end the sender.
            except Exception as exc:
                if not isinstance(exc, UplinkError):
                    log.exception("%s: unexpected error while connecting", self.sink.safe_url)
                elif attempt == 0 or self._stats.last_error != str(exc):
                    log.warning("%s: %s", self.sink.safe_url, exc)
                self._stats.last_error = str(exc) or type(exc).__name__
                self._outage = True
                with contextlib.suppress(Exception):
                    await self.sink.close()
                await self._pause(self._backoff_s(attempt))
                attempt += 1
                continue
            if connected_once:
                self._stats.reconnects_total += 1
            connected_once = True
            started = time.monotonic()
            self._set_connected()
            try:
                await self._pump()
            except UplinkError as exc:
                self._lost = str(exc)
            except Exception as exc:
                # The sender must outlive any one failure: the data is safe in the queue.
                log.exception("%s: sender failed", self.sink.safe_url)
                self._lost = f"sender failed: {exc!r}"
            finally:
                self._set_disconnected()
                self._outage = True
            if self._stopping:
                return
            log.warning("%s: %s", self.sink.safe_url, self._lost or "disconnected")
            self._stats.last_error = self._lost or self._stats.last_error
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await self.sink.close()
            if self._acks_this_connection or time.monotonic() - started >= _STABLE_S:
                attempt = 0
            await self._pause(self._backoff_s(attempt))
            attempt += 1

    def _backoff_s(self, attempt: int) -> float:
        cfg = self.cfg
        base = float(min(cfg.retry_max_ms, cfg.retry_initial_ms * 2 ** min(attempt, 30)))
        # Equal jitter: never less than half the delay, so a restarted broker isn't stampeded.
        return base * random.uniform(0.5, 1.0) / 1000.0

    async def _pause(self, delay_s: float) -> None:
        """Sleep, but wake at once when the uplink stops."""
        deadline = time.monotonic() + delay_s
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    def _set_connected(self) -> None:
        self._connected = True
        self._stats.connected = True
        if self._outage:
            self._backlog_upto = self.queue.last_seq
            self._outage = False
        self._boundary = self._backlog_upto
        self.queue.set_boundary(self._boundary)
        self._backlog_cursor = 0
        self._live_cursor = self._boundary
        self._cache.clear()
        # Live rows submitted while connecting exist only in SQLite: read them from there.
        self._spill = self.queue.last_seq > self._boundary
        self._inflight.clear()
        self._backlog_inflight = 0
        self._acks_this_connection = 0
        self._tokens = self._burst
        self._tokens_ts = time.monotonic()
        log.info(
            "%s: connected; backlog %d messages (seq <= %d)",
            self.sink.safe_url,
            self.queue.backlog,
            self._boundary,
        )

    def _set_disconnected(self) -> None:
        self._connected = False
        self._stats.connected = False
        # Unacknowledged messages stay queued and go out as backlog on the next connection.
        self._inflight.clear()
        self._backlog_inflight = 0
        self._cache.clear()
        self._spill = False
        if self.queue.is_open:
            self.queue.set_boundary(None)
            # Acks that came with the last packets: delete now, or they'd be re-sent.
            with contextlib.suppress(StoreError):
                self._flush_acks()

    async def _pump(self) -> None:
        """Move messages while the connection lasts: acks -> deletes, then refill the window."""
        ack_retry_at = 0.0
        while not self._stopping and self._lost is None:
            self._wake.clear()
            timeout: float | None = None
            if self._acked and time.monotonic() >= ack_retry_at:
                try:
                    self._flush_acks()
                except StoreError as exc:
                    # e.g. a full disk: keep the acks and retry; worst case they are re-sent.
                    self._stats.last_error = str(exc)
                    ack_retry_at = time.monotonic() + 1.0
            if self._acked:
                timeout = max(0.0, ack_retry_at - time.monotonic())
            token_wait = self._fill()
            if token_wait is not None:
                timeout = token_wait if timeout is None else min(timeout, token_wait)
            if self._lost is not None:
                return
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    def _add_live(self, rows: Sequence[Queued]) -> None:
        if self._spill or len(self._cache) + len(rows) > _LIVE_CACHE_MAX:
            self._spill = True  # these stay in SQLite only; _fill reads them back in order
        else:
            self._cache.extend(rows)

    def _topic(self, device: str, kind: str) -> str:
        topic = self._topics.get((device, kind))
        if topic is None:
            topic = self._topics[(device, kind)] = wire.topic_for(
                self.site, self.gateway_id, device, kind
            )
        return topic

    def _fill(self) -> float | None:
        """Publish into the free window, live first; returns seconds until a backlog token is due."""
        window = self.sink.window
        room = window - len(self._inflight)
        if room <= 0:
            return None
        batch: list[OutMessage] = []
        inflight = self._inflight
        topic = self._topic
        # Live: the cache, or SQLite once it overflowed.
        while room > 0:
            if self._cache:
                q = self._cache.popleft()
                batch.append((q.seq, topic(q.device, q.kind), q.payload))
                inflight[q.seq] = False
                self._live_cursor = q.seq
                room -= 1
                continue
            if not self._spill:
                break
            want = min(room, _FETCH_MAX)
            rows = self.queue.fetch(self._live_cursor, None, want)
            if len(rows) < want:
                self._spill = False  # caught up with SQLite; new submits are cached again
            for q in rows:
                batch.append((q.seq, topic(q.device, q.kind), q.payload))
                inflight[q.seq] = False
                self._live_cursor = q.seq
            room -= len(rows)
            if not rows:
                break
        # Backlog: rate-limited, and never the whole window, so live messages find room.
        token_wait: float | None = None
        if room > 0 and self._backlog_cursor < self._boundary:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._tokens_ts) * self._rate)
            self._tokens_ts = now
            backlog_window = max(1, window - window // 4)
            n = min(room, backlog_window - self._backlog_inflight, int(self._tokens), _FETCH_MAX)
            if n > 0:
                rows = self.queue.fetch(self._backlog_cursor, self._boundary, n)
                if not rows:
                    self._backlog_cursor = self._boundary
                for q in rows:
                    batch.append((q.seq, topic(q.device, q.kind), wire.as_historical(q.payload)))
                    inflight[q.seq] = True
                    self._backlog_cursor = q.seq
                self._backlog_inflight += len(rows)
                self._tokens -= len(rows)
            if self._backlog_cursor < self._boundary and self._tokens < 1.0:
                token_wait = (1.0 - self._tokens) / self._rate
        if batch:
            self._stats.sent_total += len(batch)
            self.sink.publish(batch)
        return token_wait

    def _flush_acks(self) -> None:
        if not self._acked or not self.queue.is_open:
            return
        acked = self._acked
        self._acked = []
        try:
            self.queue.ack(acked)
        except StoreError:
            self._acked = acked + self._acked
            raise
        if self.queue.depth == 0:
            self._drained.set()

    # ---- housekeeping ------------------------------------------------------------------------

    async def _housekeep(self) -> None:
        while not self._stopping:
            await asyncio.sleep(_HOUSEKEEP_S)
            try:
                while True:
                    if self.queue.expire(_EXPIRE_CHUNK) < _EXPIRE_CHUNK:
                        break
                    await asyncio.sleep(0)  # a long outage expires in chunks, between other work
                if self.queue.depth == 0 and not self._acked:
                    self._drained.set()
                if self.queue.has_pending_gaps:
                    gap = self.queue.flush_gaps()
                    if gap is not None:
                        self._drained.clear()
                        if self._connected:
                            self._add_live([gap])
                            self._wake.set()
            except StoreError as exc:
                self._stats.last_error = str(exc)
                log.error("%s", exc)
