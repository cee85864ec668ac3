# The hardware layer of an ESP32: ESP-NOW through aioespnow, machine.UART / WDT / ADC.
# It cannot run on the unix port; hil_tests/firmware/mp/test_hal.py runs it against fakes of
# network, aioespnow and machine that follow the MicroPython docs, and compiles it with mpy-cross.
#
# Radio set-up (docs.micropython.org espnow, ../shared/research/mesh.md §3):
# - STA_IF active and not connected, reconnects=0: no scans that would hop channels;
# - AP_IF active (hidden): the radio then stays out of the STA power-save mode in which ESP-NOW
#   reception is unreliable; both on the configured channel, which every node shares;
# - rxbuf raised to 4 KB before active(True) allocates it: the 526 B default holds 2 frames,
#   and frames dropped for lack of room are still ACKed to the sender;
# - peers are registered on STA_IF (the default ifidx): a node's MAC is its STA MAC.

import asyncio

import aioespnow
import machine
import network
from micropython import const

from fogmesh import sensors
from fogmesh.hal import HalError

_RXBUF = const(4096)
_MAX_MSG = const(250)
_MAX_PEERS = const(20)  # ESP-NOW's cap, broadcast peer included
_UART_BUF = const(1024)


def flash_dir():
    return "/"


class Radio:
    def __init__(self, channel):
        sta = network.WLAN(network.STA_IF)
        sta.active(True)
        try:
            sta.config(reconnects=0)
            sta.disconnect()
        except (OSError, ValueError):
            pass  # older firmware: no reconnects option
        ap = network.WLAN(network.AP_IF)
        ap.active(True)
        ap.config(channel=channel, hidden=True)
        sta.config(channel=channel)
        e = aioespnow.AIOESPNow()
        e.config(rxbuf=_RXBUF)
        e.active(True)
        self._e = e
        self.mac = bytes(sta.config("mac"))
        self._peers = []
        self.stats = {"tx": 0, "tx_fail": 0, "tx_err": 0, "rx": 0}

    def add_peer(self, mac):
        if mac in self._peers:
            return
        if len(self._peers) >= _MAX_PEERS:
            raise OSError("ESP_ERR_ESPNOW_FULL: %d peers already" % _MAX_PEERS)
        try:
            self._e.add_peer(mac)
        except OSError as err:
            if "EXIST" not in str(err):  # registered before a soft reset: keep it
                raise
        self._peers.append(bytes(mac))

    def send(self, mac, msg, sync=True):
        n = len(msg)
        if n == 0 or n > _MAX_MSG:  # espnow refuses an empty message (ESP_ERR_ESPNOW_ARG)
            raise ValueError("message of %d bytes: must be 1..%d" % (n, _MAX_MSG))
        self.stats["tx"] += 1
        try:
            ok = self._e.send(mac, msg, sync)
        except OSError:  # ESP_ERR_ESPNOW_NO_MEM (buffers full) and the like: a failed attempt
            self.stats["tx_err"] += 1
            ok = False
        if not ok:
            self.stats["tx_fail"] += 1
        return ok

    async def recv(self):
        while True:
            mac, msg = await self._e.arecv()
            if mac is not None and msg:
                self.stats["rx"] += 1
                return bytes(mac), bytes(msg)

    def rssi(self, mac):
        # peers_table is updated only as messages are read out; None for a peer never heard.
        t = self._e.peers_table.get(mac)
        return t[0] if t else None

    def close(self):
        self._e.active(False)


class Uart:
    def __init__(self, ucfg):
        kw = {"baudrate": ucfg.get("baud", 115200), "rxbuf": _UART_BUF, "txbuf": _UART_BUF,
              "timeout": 0}
        if "tx" in ucfg:
            kw["tx"] = ucfg["tx"]
            kw["rx"] = ucfg["rx"]
        self._u = machine.UART(ucfg["id"], **kw)
        self._sr = asyncio.StreamReader(self._u)
        self.dropped = 0

    async def read(self):
        while True:
            data = await self._sr.read(256)
            if data:
                return data

    def write(self, data):
        self._u.write(data)  # waits only while the 1 KB TX buffer is full
        return True

    def close(self):
        self._u.deinit()


class Adc:
    # One ADC pin per channel; value = volts · scale (+ offset).
    def __init__(self, scfg):
        self.channels = tuple(scfg["channels"])
        self._scale = float(scfg.get("scale", 1.0))
        self._off = float(scfg.get("offset", 0.0))
        self._adcs = []
        for p in scfg["pins"]:
            a = machine.ADC(machine.Pin(p))
            a.atten(machine.ADC.ATTN_11DB)  # the full 0..3.3 V range
            self._adcs.append(a)
        self._row = [0.0] * len(self._adcs)
        self.n = 0
        self.bad = 0

    def read(self):
        row = self._row
        for i in range(len(row)):
            row[i] = self._adcs[i].read_uv() * 1e-6 * self._scale + self._off
        self.n += 1
        return row


class Hal:
    name = "esp32"

    def __init__(self, cfg, log=None):
        self._cfg = cfg
        self.flash = flash_dir()
        self._radio = None

    @property
    def radio(self):
        if self._radio is None:
            self._radio = Radio(self._cfg.get("channel", 1))
        return self._radio

    def sensor(self, scfg):
        if scfg.get("kind") == "adc":
            return Adc(scfg)
        return sensors.make(scfg, self.flash)

    def uart(self, ucfg):
        if "id" not in ucfg:
            raise HalError("config uart.id is required on an ESP32 (uart.fd is the simulation's)")
        return Uart(ucfg)

    def watchdog(self, timeout_ms):
        return machine.WDT(timeout=timeout_ms)

    def reset(self):
        machine.reset()
