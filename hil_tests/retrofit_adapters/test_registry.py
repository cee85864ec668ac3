"""The adapter contract's base class, the registry that finds adapters by `type`, and the
public API of `retrofit_adapters`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import typing
from typing import ClassVar

import pytest

import retrofit_adapters
from gateway.config.fragments import DeviceBase
from gateway.config.models import DEVICE_MODELS, DEVICE_TYPES
from gateway.errors import DeviceError
from retrofit_adapters import registry
from retrofit_adapters.base import KNOWN_CAPABILITIES, Adapter, Reading
from retrofit_adapters.simulated.adapter import SimulatedAdapter
from retrofit_adapters.simulated.config import SimulatedDevice


class Recorder(Adapter):
    type_name = "recorder"
    config_model = DeviceBase
    capabilities = frozenset({"read"})

    def __init__(self, cfg: DeviceBase) -> None:
        super().__init__(cfg)
        self.calls: list[str] = []

    async def open(self) -> None:
        self.calls.append("open")

    async def read(self) -> list[Reading]:
        self.calls.append("read")
        return []

    async def close(self) -> None:
        self.calls.append("close")


class NotAnAdapter:
    type_name = "simulated"


class Misnamed(Recorder):
    type_name = "something_else"


def test_public_api() -> None:
    assert sorted(retrofit_adapters.__all__) == sorted(
        [
            "Adapter",
            "Reading",
            "adapter_class",
            "known_types",
            "CAP_READ",
            "CAP_WRITE",
            "CAP_SUBSCRIBE",
            "KNOWN_CAPABILITIES",
        ]
    )
    for name in retrofit_adapters.__all__:
        assert getattr(retrofit_adapters, name) is not None


def test_simulated_is_registered() -> None:
    assert registry.adapter_class("simulated") is SimulatedAdapter
    assert "simulated" in registry.known_types()


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(DeviceError, match=r"unknown device type 'modbus_xyz'.*simulated"):
        registry.adapter_class("modbus_xyz")


def test_registry_agrees_with_the_config_schema() -> None:
    # A new adapter must appear in both places, or a config would validate a device no
    # adapter can run (or the reverse).
    assert registry.known_types() == sorted(DEVICE_TYPES)
    for type_name in registry.known_types():
        cls = registry.adapter_class(type_name)
        assert cls.config_model in DEVICE_MODELS
        annotation = cls.config_model.model_fields["type"].annotation
        assert typing.get_args(annotation) == (type_name,)
        assert cls.capabilities <= KNOWN_CAPABILITIES
        assert "read" in cls.capabilities


def test_adapter_modules_are_imported_only_when_asked_for() -> None:
    code = (
        "import sys, retrofit_adapters, retrofit_adapters.registry as r, gateway.config.models\n"
        "assert 'retrofit_adapters.simulated.adapter' not in sys.modules\n"
        "r.adapter_class('simulated')\n"
        "assert 'retrofit_adapters.simulated.adapter' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_import_order_has_no_cycle() -> None:
    # gateway.config imports the simulated config; the adapter base imports gateway.config.
    for first in ("retrofit_adapters.base", "gateway.config.models", "gateway.supervisor"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {first}; import retrofit_adapters.registry"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (first, proc.stderr)


def test_missing_module_is_a_device_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._ADAPTERS, "ghost", "fogmesh_no_such_vendor_lib:Ghost")
    assert "ghost" in registry.known_types()
    with pytest.raises(
        DeviceError, match=r"'ghost' could not be loaded.*fogmesh_no_such_vendor_lib"
    ):
        registry.adapter_class("ghost")


def test_target_must_be_the_adapter_of_that_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._ADAPTERS, "simulated", f"{__name__}:NotAnAdapter")
    with pytest.raises(DeviceError, match="not an Adapter subclass"):
        registry.adapter_class("simulated")
    monkeypatch.setitem(registry._ADAPTERS, "simulated", f"{__name__}:Misnamed")
    with pytest.raises(DeviceError, match="declares type_name 'something_else'"):
        registry.adapter_class("simulated")
    monkeypatch.setitem(registry._ADAPTERS, "simulated", f"{__name__}:Absent")
    with pytest.raises(DeviceError, match="not an Adapter subclass"):
        registry.adapter_class("simulated")


# --- the base class ------------------------------------------------------------------


def test_misspelt_capability_fails_at_class_creation() -> None:
    with pytest.raises(TypeError, match="unknown capabilities Write"):

        class Bad(Recorder):
            capabilities: ClassVar[frozenset[str]] = frozenset({"read", "Write"})


def test_context_manager_opens_and_closes_even_on_error() -> None:
    adapter = Recorder(DeviceBase(id="d1"))

    async def go() -> None:
        async with adapter as a:
            assert a is adapter
            await a.read()
        with pytest.raises(RuntimeError):
            async with adapter:
                raise RuntimeError("boom")

    asyncio.run(go())
    assert adapter.calls == ["open", "read", "close", "open", "close"]


def test_default_write_refuses() -> None:
    adapter = Recorder(DeviceBase(id="d1"))
    with pytest.raises(DeviceError, match="recorder device 'd1' does not support writes"):
        asyncio.run(adapter.write("x", 1))


def test_default_tag_names_come_from_config_tags() -> None:
    assert Recorder(DeviceBase(id="d1")).tag_names() is None  # no tags: no check
    dev = SimulatedDevice(id="p", type="simulated", tags=[{"name": "flow_m3h"}])  # type: ignore[list-item]
    assert Recorder(dev).tag_names() == ["flow_m3h"]
    # The simulated device overrides it: no tags means every signal of its model.
    implicit = SimulatedAdapter(SimulatedDevice(id="p", type="simulated"))
    assert implicit.tag_names() == [
        "flow_m3h",
        "pressure_bar",
        "temperature_c",
        "vibration_mm_s",
    ]
