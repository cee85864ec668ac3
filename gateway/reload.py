"""Granular hot reload: what differs between two configs, and the edge stage split per device and
per rule so that a reload rebuilds only the parts of it whose config changed.

`diff_configs` says which devices were added, removed, changed or left alone, which rules
changed, and which settings cannot change while the gateway runs. `EdgeSet` is the runtime's edge
stage: one `EdgeStage` for the windows and raw forwarding of each device and one per rule, so
that the open windows of a device whose tags did not change, and the state of an unchanged rule,
survive a reload untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

from gateway.config.fragments import DeviceBase, TagBase
from gateway.config.models import GatewayConfig, RuleConfig
from gateway.edge import EdgeStage, EdgeStats
from gateway.errors import FogmeshError
from gateway.model import Outgoing, Sample

__all__ = ["ConfigDiff", "EdgeSet", "ReloadRefused", "diff_configs", "effective_tags"]

# Sections that only a restart can change: the queue, the sink connection, the listening
# socket and the identity in every topic are opened once per run.
_RESTART_SECTIONS = ("gateway", "http", "uplink")
_LIVE_HTTP_KEYS = frozenset({"token", "tokens"})  # bearer tokens are swapped live


class ReloadRefused(FogmeshError):
    """A reload that changed nothing: the new config is invalid, or only a restart can apply it.

    `status` is the HTTP answer: 422 with `problems`, 409 with `restart_required` (or when there
    is no file to reload), 503 when the gateway is not running.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        problems: Sequence[str] = (),
        restart_required: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = list(problems)
        self.restart_required = list(restart_required)


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What a reload from `old` to `new` must do; device lists hold ids in config order."""

    added: tuple[str, ...] = ()  # enabled now, not running before
    removed: tuple[str, ...] = ()  # running before, gone or disabled now
    changed: tuple[str, ...] = ()  # running in both, config (or one of its secrets) differs
    unchanged: tuple[str, ...] = ()
    rules_added: tuple[str, ...] = ()
    rules_removed: tuple[str, ...] = ()
    rules_changed: tuple[str, ...] = ()
    edge_changed: bool = False  # [edge] differs: every device's windows are rebuilt
    tokens_changed: bool = False  # [http] token / tokens, or what their secrets hold
    restart_required: tuple[str, ...] = ()  # dotted keys that only a restart can apply

    @property
    def restart(self) -> tuple[str, ...]:
        """Devices whose service stops: the removed and the changed."""
        return self.removed + self.changed


def _enabled(cfg: GatewayConfig) -> dict[str, DeviceBase]:
    devices = cast(list[DeviceBase], cfg.devices)
    return {d.id: d for d in devices if d.enabled}


def _device_secrets(cfg: GatewayConfig, secrets: Mapping[str, str]) -> dict[str, dict[str, str]]:
    # Secrets are keyed by index ("devices[2].password"); the diff needs them by device id.
    devices = cast(list[DeviceBase], cfg.devices)
    out: dict[str, dict[str, str]] = {}
    for i, d in enumerate(devices):
        prefix = f"devices[{i}]."
        out[d.id] = {k[len(prefix) :]: v for k, v in secrets.items() if k.startswith(prefix)}
    return out


def _leaf_diff(prefix: str, a: object, b: object) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in dict.fromkeys([*a, *b]):
            out += _leaf_diff(f"{prefix}.{key}", a.get(key), b.get(key))
        return out
    return [] if a == b else [prefix]


def diff_configs(
    old: GatewayConfig,
    new: GatewayConfig,
    *,
    old_secrets: Mapping[str, str] | None = None,
    new_secrets: Mapping[str, str] | None = None,
) -> ConfigDiff:
    """Compare two validated configs (and the secrets they resolved) for a reload."""
    old_s = old_secrets or {}
    new_s = new_secrets or {}
    restart: list[str] = []
    for section in _RESTART_SECTIONS:
        a = getattr(old, section).model_dump()
        b = getattr(new, section).model_dump()
        if section == "http":
            for key in _LIVE_HTTP_KEYS:
                a.pop(key, None)
                b.pop(key, None)
        restart += _leaf_diff(section, a, b)
    for key in dict.fromkeys([*old_s, *new_s]):
        if key.startswith("uplink.") and old_s.get(key) != new_s.get(key) and key not in restart:
            restart.append(key)

    http_a = (old.http.token, old.http.tokens)
    http_b = (new.http.token, new.http.tokens)
    secrets_a = {k: v for k, v in old_s.items() if k.startswith("http.")}
    secrets_b = {k: v for k, v in new_s.items() if k.startswith("http.")}
    tokens_changed = http_a != http_b or secrets_a != secrets_b

    before, after = _enabled(old), _enabled(new)
    sec_a, sec_b = _device_secrets(old, old_s), _device_secrets(new, new_s)
    added = [d for d in after if d not in before]
    removed = [d for d in before if d not in after]
    changed: list[str] = []
    unchanged: list[str] = []
    for d, cfg in after.items():
        if d not in before:
            continue
        same = before[d] == cfg and sec_a.get(d, {}) == sec_b.get(d, {})
        (unchanged if same else changed).append(d)

    rules_a = {r.name: r for r in old.rules}
    rules_b = {r.name: r for r in new.rules}
    return ConfigDiff(
        added=tuple(added),
        removed=tuple(removed),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        rules_added=tuple(n for n in rules_b if n not in rules_a),
        rules_removed=tuple(n for n in rules_a if n not in rules_b),
        rules_changed=tuple(n for n, r in rules_b.items() if n in rules_a and rules_a[n] != r),
        edge_changed=old.edge != new.edge,
        tokens_changed=tokens_changed,
        restart_required=tuple(restart),
    )


# --- the edge stage, per device and per rule -----------------------------------------------


def effective_tags(dev: DeviceBase) -> list[TagBase]:
    """The tags the edge stage knows for a device (a simulated device's may be implicit)."""
    derived = getattr(dev, "effective_tags", None)
    tags = derived() if callable(derived) else getattr(dev, "tags", [])
    return [t for t in tags if isinstance(t, TagBase)]


def _only(
    cfg: GatewayConfig, devices: list[Any], rules: list[RuleConfig], *, models: bool = True
) -> GatewayConfig:
    # The stage reads `edge`, `devices`, `rules` and `models`; the copy shares everything else.
    # A device's models run in its window stage only, never again in a rule's stage.
    ids = {d.id for d in devices}
    keep = [m for m in cfg.models if m.device in ids] if models else []
    return cfg.model_copy(update={"devices": devices, "rules": rules, "models": keep})


def _device_models(cfg: GatewayConfig, dev_id: str) -> list[Any]:
    return [m for m in cfg.models if m.device == dev_id]


class _RuleSlot:
    __slots__ = ("device", "rule", "stage", "tag")

    def __init__(self, rule: RuleConfig, tag: TagBase, stage: EdgeStage) -> None:
        self.rule = rule
        self.device = rule.device
        self.tag = tag
        self.stage = stage


class EdgeSet:
    """The edge stage of a running gateway, rebuilt piecewise by `reconfigure`.

    Same calls and same output as one `EdgeStage` over the whole config, except that events of
    one poll come after its raw forwards rather than interleaved with them. Windows and raw
    forwarding of each enabled device live in their own stage; each rule in a stage of its own
    that knows only the rule's tag (with forwarding off), so a rule is evaluated exactly once.
    """

    def __init__(self, cfg: GatewayConfig, *, started: float | None = None) -> None:
        self._cfg = cfg
        self._windows: dict[str, EdgeStage] = {}
        self._tags: dict[str, list[TagBase]] = {}
        self._rules: dict[str, _RuleSlot] = {}
        self._by_device: dict[str, tuple[EdgeStage, ...]] = {}
        self._retired = EdgeStats()
        self._unknown = 0  # samples of devices that have no stage
        self._unbound: tuple[str, ...] = ()
        devices = _enabled(cfg)
        for dev_id, dev in devices.items():
            self._windows[dev_id] = self._window_stage(cfg, dev, started)
            self._tags[dev_id] = effective_tags(dev)
        self._place_rules(cfg, devices, keep={})

    @property
    def unbound_rules(self) -> tuple[str, ...]:
        """Rules whose device is not enabled or has no such tag (the loader refuses those)."""
        return self._unbound

    def _window_stage(
        self, cfg: GatewayConfig, dev: DeviceBase, started: float | None
    ) -> EdgeStage:
        return EdgeStage(_only(cfg, [dev], []), grace_s=cfg.edge.grace_s, started=started)

    def _place_rules(
        self, cfg: GatewayConfig, devices: Mapping[str, DeviceBase], keep: Mapping[str, _RuleSlot]
    ) -> None:
        rules: dict[str, _RuleSlot] = {}
        unbound: list[str] = []
        for rc in cfg.rules:
            dev = devices.get(rc.device)
            tag = next((t for t in effective_tags(dev) if t.name == rc.tag), None) if dev else None
            if dev is None or tag is None:
                unbound.append(rc.name)
                continue
            old = keep.get(rc.name)
            if old is not None and old.rule == rc and old.tag.name == tag.name:
                rules[rc.name] = old
                continue
            quiet = tag.model_copy(update={"forward": "none"})
            only = dev.model_copy(update={"tags": [quiet]})
            rules[rc.name] = _RuleSlot(rc, tag, EdgeStage(_only(cfg, [only], [rc], models=False)))
        by_device: dict[str, list[EdgeStage]] = {}
        for slot in rules.values():
            by_device.setdefault(slot.device, []).append(slot.stage)
        self._rules = rules
        self._by_device = {d: tuple(s) for d, s in by_device.items()}
        self._unbound = tuple(unbound)

    # --- the EdgeStage calls ------------------------------------------------------------

    def process(self, samples: Sequence[Sample]) -> list[Outgoing]:
        out: list[Outgoing] = []
        windows = self._windows
        by_device = self._by_device
        n = len(samples)
        i = 0
        while i < n:
            # Batches are one device's poll, so runs are long: split them, not every sample.
            dev = samples[i].device
            j = i + 1
            while j < n and samples[j].device == dev:
                j += 1
            run = samples if i == 0 and j == n else samples[i:j]
            stage = windows.get(dev)
            if stage is None:
                self._unknown += j - i
            else:
                out += stage.process(run)
                for rule_stage in by_device.get(dev, ()):
                    out += rule_stage.process(run)
            i = j
        return out

    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for stage in self._windows.values():  # rule stages hold no windows and no raw tags
            out += stage.tick(now)
        return out

    def flush(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for stage in self._windows.values():
            out += stage.flush(now)
        return out

    def stats(self) -> EdgeStats:
        total = _copy(self._retired)
        for stage in self._windows.values():
            _add(total, stage.stats())
        for slot in self._rules.values():
            total.events_out += slot.stage.stats().events_out
        total.unknown_tag_samples += self._unknown
        return total

    # --- reload -------------------------------------------------------------------------

    def reconfigure(self, cfg: GatewayConfig, now: float) -> tuple[list[Outgoing], list[str]]:
        """Switch to `cfg`; returns what the stages it drops flushed, and the devices enabled
        before and after whose windows were rebuilt.

        A device keeps its stage (its open windows, raw state and model state) when it is
        still enabled, its effective tags and its [[models]] entries are the same and [edge]
        did not change, even if its service is
        restarted; otherwise the old stage is flushed now, its current windows marked
        partial, and the new one starts with windows marked partial. Call it after the
        devices that stop have stopped and the bus has been drained, so no sample of theirs
        is still on its way.
        """
        devices = _enabled(cfg)
        same_edge = cfg.edge == self._cfg.edge
        windows: dict[str, EdgeStage] = {}
        tags: dict[str, list[TagBase]] = {}
        rebuilt: list[str] = []
        for dev_id, dev in devices.items():
            dev_tags = effective_tags(dev)
            old = self._windows.get(dev_id)
            if (
                old is not None
                and same_edge
                and self._tags.get(dev_id) == dev_tags
                and _device_models(cfg, dev_id) == _device_models(self._cfg, dev_id)
            ):
                windows[dev_id] = old
            else:
                windows[dev_id] = self._window_stage(cfg, dev, now)
                if old is not None:
                    rebuilt.append(dev_id)
            tags[dev_id] = dev_tags
        out: list[Outgoing] = []
        kept = {id(s) for s in windows.values()}
        for stage in self._windows.values():
            if id(stage) not in kept:
                out += stage.flush(now)
                _add(self._retired, stage.stats())
        old_rules = self._rules
        self._place_rules(cfg, devices, keep=old_rules)
        for name, slot in old_rules.items():
            if self._rules.get(name) is not slot:
                self._retired.events_out += slot.stage.stats().events_out
        self._windows = windows
        self._tags = tags
        self._cfg = cfg
        return out, rebuilt


def _copy(s: EdgeStats) -> EdgeStats:
    return EdgeStats(**{f.name: getattr(s, f.name) for f in fields(EdgeStats)})


def _add(into: EdgeStats, s: EdgeStats) -> None:
    for f in fields(EdgeStats):
        setattr(into, f.name, getattr(into, f.name) + getattr(s, f.name))
