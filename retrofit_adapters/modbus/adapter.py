"""The `modbus_tcp` and `modbus_rtu` adapters: each poll reads the tags due now with the
coalesced request plan, decodes them with the codec, and writes tags through the same codec, all
through the connection owner of the device's endpoint or serial line (transport.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final, cast

from gateway.config.fragments import DeviceBase
from gateway.errors import DeviceError
from gateway.model import Value
from retrofit_adapters.base import CAP_READ, CAP_WRITE, Adapter, Reading
from retrofit_adapters.modbus.codec import decode_tag, encode_bit, encode_tag
from retrofit_adapters.modbus.config import ModbusRtuDevice, ModbusTag, ModbusTcpDevice
from retrofit_adapters.modbus.plan import plan_reads
from retrofit_adapters.modbus.transport import (
    ConnectionOwner,
    Endpoint,
    ReadOp,
    acquire,
    rtu_endpoint,
    tcp_endpoint,
)

__all__ = ["ModbusRtuAdapter", "ModbusTcpAdapter"]

# The share of the device's timeout_ms one request may take (its attempts together); the rest
# covers waiting for the line and decoding, so that the adapter's own message (which request,
# which unit) reaches last_error rather than the supervisor's generic one.
_REQUEST_SHARE: Final = 0.9
_MAX_PLANS: Final = 256  # cached plans per device (one per set of due tags)

# One request of a plan: the prepared read, and per tag (tag, first value, values it spans).
_Step = tuple[ReadOp, tuple[tuple[ModbusTag, int, int], ...]]


class _ModbusAdapter(Adapter):
    """What TCP and RTU share; subclasses say where the connection goes."""

    capabilities = frozenset({CAP_READ, CAP_WRITE})

    def __init__(self, cfg: DeviceBase, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(cfg, clock=clock)
        if not isinstance(cfg, self.config_model) or not isinstance(
            cfg, ModbusTcpDevice | ModbusRtuDevice
        ):
            raise TypeError(
                f"{type(self).__name__} needs a Modbus device config, got {type(cfg).__name__}"
            )
        self._dev: ModbusTcpDevice | ModbusRtuDevice = cfg
        self._unit = cfg.unit
        self._retries = cfg.limits.retries
        self._request_s = cfg.timeout_ms / 1000.0 * _REQUEST_SHARE
        self._by_name = {t.name: t for t in cfg.tags}
        self._always = tuple(t for t in cfg.tags if t.period_ms is None)
        # Tags with their own period: read when due, on a grid like the supervisor's.
        self._timed = tuple(t for t in cfg.tags if t.period_ms is not None)
        self._timed_s = tuple((t.period_ms or 0) / 1000.0 for t in self._timed)
        self._next_due = [-math.inf] * len(self._timed)
        # A poll up to half a device period early still counts: the supervisor's grid jitters.
        self._slack_s = cfg.period_ms / 2000.0
        self._plans: dict[int, tuple[_Step, ...]] = {}
        self._owner: ConnectionOwner | None = None

    def _endpoint(self) -> Endpoint:
        raise NotImplementedError

    def tag_names(self) -> list[str]:
        return list(self._by_name)

    @property
    def owner(self) -> ConnectionOwner | None:
        """The connection owner while open (shared with other devices on the same line)."""
        return self._owner

    async def open(self) -> None:
        if self._owner is None:
            self._owner = acquire(
                self._endpoint(), inter_frame_s=self._dev.frame_delay_ms() / 1000.0
            )
        await self._owner.connect(self._request_s)

    async def close(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.release()

    async def read(self) -> list[Reading]:
        owner = self._require_owner()
        due = self._due_mask(self.clock()) if self._timed else 0
        plan = self._plans.get(due)
        if plan is None:
            plan = self._plan(due)
        out: list[Reading] = []
        append = out.append
        request_s = self._request_s
        retries = self._retries
        for op, tags in plan:
            values = await owner.read(op, request_s, retries)
            for tag, first, n in tags:
                append(Reading(tag.name, decode_tag(tag, values[first : first + n])))
        if due:
            self._advance(due, self.clock())
        return out

    async def write(self, tag: str, value: Value) -> None:
        t = self._by_name.get(tag)
        if t is None:
            raise DeviceError(f"device {self._dev.id!r} has no tag {tag!r}")
        if not t.writable:
            raise DeviceError(f"tag {tag!r} is not writable")
        owner = self._require_owner()
        address = t.offset_address(self._dev.addressing)
        unit, request_s, retries = self._unit, self._request_s, self._retries
        if t.table == "coil":
            bits = cast(list[bool], encode_tag(t, value))
            await owner.write_coils(unit, address, bits, request_s, retries)
        elif t.bit is not None:
            encode_bit(t, 0, value)  # refuse a bad value before touching the device

            def change(current: int) -> int:
                return encode_bit(t, current, value)

            await owner.modify_register(unit, address, change, request_s, retries)
        else:
            registers = cast(list[int], encode_tag(t, value))
            await owner.write_registers(unit, address, registers, request_s, retries)

    # --- helpers -----------------------------------------------------------------------

    def _require_owner(self) -> ConnectionOwner:
        if self._owner is None:
            raise DeviceError(f"{self.type_name} device {self._dev.id!r} is not open")
        return self._owner

    def _due_mask(self, now: float) -> int:
        mask = 0
        edge = now + self._slack_s
        for i, due in enumerate(self._next_due):
            if edge >= due:
                mask |= 1 << i
        return mask

    def _advance(self, mask: int, now: float) -> None:
        for i, period in enumerate(self._timed_s):
            if mask >> i & 1:
                due = self._next_due[i] + period
                # First read, or polls were missed: restart the grid from now, no burst.
                self._next_due[i] = due if due > now - self._slack_s else now + period

    def _plan(self, due: int) -> tuple[_Step, ...]:
        tags = list(self._always)
        tags.extend(t for i, t in enumerate(self._timed) if due >> i & 1)
        steps: list[_Step] = []
        for req in plan_reads(tags, self._dev.addressing, self._dev.limits):
            op = ReadOp(self._unit, req.table, req.start, req.count)
            steps.append((op, tuple((tag, first, tag.register_count()) for tag, first in req.tags)))
        plan = tuple(steps)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()  # incommensurate periods: do not grow without bound
        self._plans[due] = plan
        return plan


class ModbusTcpAdapter(_ModbusAdapter):
    """A Modbus TCP server, or one unit behind a TCP gateway; devices with the same host and
    port share one connection."""

    type_name = "modbus_tcp"
    config_model = ModbusTcpDevice

    def _endpoint(self) -> Endpoint:
        dev = self._dev
        assert isinstance(dev, ModbusTcpDevice)
        return tcp_endpoint(dev.host, dev.port)


class ModbusRtuAdapter(_ModbusAdapter):
    """A Modbus RTU slave on a serial line (or RTU over TCP, `socket://host:port`); devices on
    the same port share it, one frame at a time with the inter-frame silence between."""

    type_name = "modbus_rtu"
    config_model = ModbusRtuDevice

    def _endpoint(self) -> Endpoint:
        dev = self._dev
        assert isinstance(dev, ModbusRtuDevice)
        return rtu_endpoint(dev.port, dev.baudrate, dev.bytesize, dev.parity, dev.stopbits)
