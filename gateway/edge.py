"""The edge stage: turns the bus's samples into what goes upstream — window summaries, rule events,
model events and, for tags that ask for it, raw values reported by exception. The exact semantics
are in docs/edge.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway.config.fragments import TagBase
from gateway.config.models import GatewayConfig, ModelConfig, RuleConfig
from gateway.inference import ModelRunner, ModelStats, load_runners
from gateway.model import KIND_EVENT, KIND_RAW, KIND_SUMMARY, Outgoing, Quality, Sample, Value
from retrofit_adapters.simulated.config import SimulatedDevice

__all__ = ["EdgeStage", "EdgeStats"]

_BAD = Quality.BAD
_ABOVE = "above"
_BELOW = "below"


@dataclass(slots=True)
class EdgeStats:
    """Counters of the edge stage since it was built; `stats()` hands out a snapshot."""

    samples_in: int = 0  # every sample given to process(), known or not
    samples_bad: int = 0  # known-tag samples of BAD quality (non-finite values and ts included)
    samples_late: int = 0  # samples whose window was already closed; dropped from windows only
    raw_out: int = 0
    summaries_out: int = 0
    events_out: int = 0  # rule and model events
    unknown_tag_samples: int = 0  # (device, tag) not in the config, or device disabled
    # [[models]], summed over the stage's models (a tag in two models counts twice)
    model_samples_bad: int = 0  # BAD, non-finite or non-numeric samples of model tags
    model_rows: int = 0  # complete rows
    model_rows_dropped: int = 0  # complete rows with a bad value, not scored
    model_inferences: int = 0  # rows scored
    model_errors: int = 0  # rows whose inference failed
    model_events: int = 0  # also counted in events_out
    model_time_s: float = 0.0  # spent scoring rows


def _ms(seconds: float) -> int:
    # Every time comparison is made on whole milliseconds, the same numbers that go on the
    # wire, so that float noise in epoch seconds (~0.2 µs) never moves a boundary.
    return round(seconds * 1000.0)


class _Acc:
    """Welford accumulator of one tag in one window (numerically stable mean and variance)."""

    __slots__ = ("bad", "m2", "max", "mean", "min", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.bad = 0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x

    def body(self, unit: str) -> dict[str, Any]:
        if self.n == 0:
            return {
                "count": 0,
                "min": None,
                "max": None,
                "mean": None,
                "std": None,
                "bad": self.bad,
                "unit": unit,
            }
        return {
            "count": self.n,
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            # population std: the window is the whole population being summarised
            "std": math.sqrt(self.m2 / self.n) if self.m2 > 0.0 else 0.0,
            "bad": self.bad,
            "unit": unit,
        }


class _Group:
    """The tags of one device that share one window length: one summary message per window."""

    __slots__ = ("device", "len_ms", "open", "tags", "watermark")

    def __init__(self, device: str, len_ms: int) -> None:
        self.device = device
        self.len_ms = len_ms
        self.tags: list[_Tag] = []  # config order, so message bodies are deterministic
        self.open: dict[int, dict[str, _Acc]] = {}  # window index -> tag name -> accumulator
        # Windows with an index below this are closed; None until the first tick.
        self.watermark: int | None = None

    def close(self, k: int, partial: bool) -> Outgoing | None:
        accs = self.open.pop(k)
        tags = {t.name: accs[t.name].body(t.unit) for t in self.tags if t.name in accs}
        if not tags:
            return None
        start_ms = k * self.len_ms
        return Outgoing(
            self.device,
            KIND_SUMMARY,
            start_ms,
            {
                "window_s": self.len_ms / 1000.0,
                "start_ms": start_ms,
                "end_ms": start_ms + self.len_ms,
                "partial": partial,
                "tags": tags,
            },
        )


class _Rule:
    """State machine of one threshold rule: inactive -> (pending for for_ms) -> active -> cleared."""

    __slots__ = (
        "above",
        "active",
        "below",
        "device",
        "for_ms",
        "hysteresis",
        "name",
        "pending",
        "pending_ms",
        "severity",
        "tag",
    )

    def __init__(self, cfg: RuleConfig) -> None:
        self.name = cfg.name
        self.device = cfg.device
        self.tag = cfg.tag
        self.above = cfg.above
        self.below = cfg.below
        self.hysteresis = cfg.hysteresis
        self.for_ms: int = cfg.for_ms
        self.severity = cfg.severity
        self.active: str | None = None  # direction while active
        self.pending: str | None = None  # direction being timed before activation
        self.pending_ms = 0  # ts of the first sample of the current pending run

    def _event(self, state: str, direction: str, value: Value, ts_ms: int) -> Outgoing:
        return Outgoing(
            self.device,
            KIND_EVENT,
            ts_ms,
            {
                "rule": self.name,
                "tag": self.tag,
                "state": state,
                "value": value,
                "limit": self.above if direction == _ABOVE else self.below,
                "direction": direction,
                "severity": self.severity,
            },
        )

    def feed(self, x: float, value: Value, ts_ms: int, out: list[Outgoing]) -> int:
        """Evaluate one usable sample; append events to `out` and return how many."""
        above = self.above
        below = self.below
        if above is not None and x > above:
            beyond: str | None = _ABOVE
        elif below is not None and x < below:
            beyond = _BELOW
        else:
            beyond = None
        n = 0
        active = self.active
        if active is not None:
            if beyond is None or beyond == active:
                # Hysteresis applies on the side that fired; the other limit plays no part.
                if active == _ABOVE:
                    inside = above is not None and x <= above - self.hysteresis
                else:
                    inside = below is not None and x >= below + self.hysteresis
                if not inside:
                    return 0
                self.active = None
                self.pending = None
                out.append(self._event("cleared", active, value, ts_ms))
                return 1
            # Straight across a band: the old side clears, the new side is timed from here.
            self.active = None
            self.pending = None
            out.append(self._event("cleared", active, value, ts_ms))
            n = 1
        if beyond is None:
            self.pending = None
            return n
        if self.pending != beyond:
            self.pending = beyond
            self.pending_ms = ts_ms
        if ts_ms - self.pending_ms >= self.for_ms:
            self.active = beyond
            self.pending = None
            out.append(self._event("active", beyond, value, ts_ms))
            n += 1
        return n


class _Tag:
    """Everything the stage keeps for one (device, tag); looked up once per sample."""

    __slots__ = (
        "cur_acc",
        "cur_k",
        "db_abs",
        "db_frac",
        "device",
        "group",
        "hb_ms",
        "latest_ms",
        "latest_num",
        "latest_q",
        "latest_v",
        "models",
        "name",
        "raw",
        "rules",
        "sent_ms",
        "sent_num",
        "sent_q",
        "sent_v",
        "unit",
    )

    def __init__(self, device: str, cfg: TagBase, group: _Group | None) -> None:
        self.device = device
        self.name = cfg.name
        self.unit = cfg.unit
        self.group = group
        self.raw = cfg.forward == "raw"
        # No deadband at all means "every change": an absolute deadband of 0.
        self.db_abs = cfg.deadband if cfg.deadband is not None else 0.0
        self.db_frac = cfg.deadband_percent / 100.0 if cfg.deadband_percent is not None else None
        self.hb_ms = max(1, _ms(cfg.heartbeat_s)) if cfg.heartbeat_s is not None else None
        self.rules: tuple[_Rule, ...] = ()
        self.models: tuple[ModelRunner, ...] = ()
        # window cache: the accumulator of the window the last sample fell in
        self.cur_k: int | None = None
        self.cur_acc: _Acc | None = None
        # raw forwarding: the last value sent and the newest value seen; `*_num` is the value
        # as a finite float when the deadband applies to it (not for bool, str, NaN, inf)
        self.sent_ms: int | None = None
        self.sent_v: Value = 0.0
        self.sent_num: float | None = None
        self.sent_q: Quality = Quality.GOOD
        self.latest_ms: int | None = None
        self.latest_v: Value = 0.0
        self.latest_num: float | None = None
        self.latest_q: Quality = Quality.GOOD

    def changed(self, v: Value, dnum: float | None, q: Quality, ts_ms: int) -> bool:
        """Report-by-exception test of a raw sample against the last value sent."""
        sent_ms = self.sent_ms
        if sent_ms is None or q != self.sent_q:
            return True
        hb_ms = self.hb_ms
        if hb_ms is not None and ts_ms - sent_ms >= hb_ms:
            return True
        last = self.sent_num
        if dnum is not None and last is not None:
            if self.db_frac is not None:
                # percent of |last|: from a last value of 0 every change counts
                return abs(dnum - last) > self.db_frac * abs(last)
            return abs(dnum - last) > self.db_abs
        return _differs(v, self.sent_v)

    def raw_message(self, v: Value, dnum: float | None, q: Quality, ts_ms: int) -> Outgoing:
        self.sent_ms = ts_ms
        self.sent_v = v
        self.sent_num = dnum
        self.sent_q = q
        return Outgoing(
            self.device,
            KIND_RAW,
            ts_ms,
            {"tag": self.name, "value": v, "quality": q.value, "unit": self.unit},
        )


def _differs(a: Value, b: Value) -> bool:
    if type(a) is not type(b):
        return True
    # NaN != NaN, yet a NaN repeated is not news
    return a != b and not (a != a and b != b)


def _enabled_devices(cfg: GatewayConfig) -> list[tuple[str, list[TagBase]]]:
    """(device id, tags) of every enabled device; a simulated device's tags may be implicit."""
    devices: list[Any] = list(cfg.devices)
    out: list[tuple[str, list[TagBase]]] = []
    for dev in devices:
        if not dev.enabled:
            continue
        tags = dev.effective_tags() if isinstance(dev, SimulatedDevice) else dev.tags
        out.append((dev.id, list(tags)))
    return out


class EdgeStage:
    """Per-tag windows, deadband/heartbeat forwarding and threshold rules over the sample stream.

    Not thread-safe; the runtime calls it from one event loop. `grace_s` delays the closing
    of windows so that samples read just before a boundary but processed after it still count.
    """

    def __init__(
        self,
        cfg: GatewayConfig,
        *,
        grace_s: float = 0.0,
        started: float | None = None,
        models: Sequence[ModelConfig] | None = None,
        base_dir: Path | None = None,
    ) -> None:
        """`models`: the [[models]] to run (default cfg.models); each is loaded here and bound
        when its device is an enabled device of cfg with all its tags, else it is listed in
        `unbound_models`. A model that cannot be loaded raises ConfigError (paths
        `models[i].path` / `.tags`, i counting in cfg.models when `models` is None).
        Relative model paths resolve against `base_dir` (default: the working directory).
        """
        self._grace_ms = max(0, _ms(grace_s))
        # Windows that began before the stage started are incomplete: marked partial.
        self._started_ms = _ms(started) if started is not None else None
        self._stats = EdgeStats()
        self._tags: dict[tuple[str, str], _Tag] = {}
        self._groups: list[_Group] = []
        default_ms = max(1, _ms(cfg.edge.window_s))
        groups: dict[tuple[str, int], _Group] = {}
        for device, tag_cfgs in _enabled_devices(cfg):
            for tc in tag_cfgs:
                group = None
                if tc.forward != "none":
                    len_ms = max(1, _ms(tc.window_s)) if tc.window_s is not None else default_ms
                    group = groups.get((device, len_ms))
                    if group is None:
                        group = groups[(device, len_ms)] = _Group(device, len_ms)
                        self._groups.append(group)
                tag = _Tag(device, tc, group)
                if group is not None:
                    group.tags.append(tag)
                self._tags[(device, tc.name)] = tag
        self._raw_tags = [t for t in self._tags.values() if t.raw]
        self._hb_tags = [t for t in self._raw_tags if t.hb_ms is not None]
        unbound: list[str] = []
        for rc in cfg.rules:
            owner = self._tags.get((rc.device, rc.tag))
            if owner is None:
                unbound.append(rc.name)
                continue
            owner.rules = (*owner.rules, _Rule(rc))
        # Rules on unknown or disabled tags can never fire; the config loader reports them.
        self.unbound_rules: tuple[str, ...] = tuple(unbound)
        # Only the models this stage can feed are loaded (a stage may hold part of a config).
        wanted = list(cfg.models if models is None else models)

        def feedable(m: ModelConfig) -> bool:
            return all((m.device, t) in self._tags for t in m.tags)

        self.unbound_models: tuple[str, ...] = tuple(m.name for m in wanted if not feedable(m))
        runners = load_runners(wanted, base_dir=base_dir, select=feedable)
        self._models: tuple[ModelRunner, ...] = tuple(runners)
        for runner in runners:
            for name in runner.tags:
                tag = self._tags[(runner.device, name)]
                tag.models = (*tag.models, runner)

    def process(self, samples: Sequence[Sample]) -> list[Outgoing]:
        """Feed samples into windows; return raw forwards and events they cause, in order."""
        out: list[Outgoing] = []
        st = self._stats
        tags = self._tags
        st.samples_in += len(samples)
        for s in samples:
            t = tags.get((s.device, s.tag))
            if t is None:
                st.unknown_tag_samples += 1
                continue
            v = s.value
            q = s.quality
            # num: the value for statistics and rules; dnum: the value the deadband applies to
            # (bool counts as 0/1 in windows and rules but is a discrete state for forwarding)
            num: float | None
            dnum: float | None = None
            try:
                ts_ms = _ms(s.ts)
                if isinstance(v, bool):
                    num = 1.0 if v else 0.0
                elif isinstance(v, (int, float)):
                    num = float(v)
                    if math.isfinite(num):
                        dnum = num
                    else:
                        num = None
                        q = _BAD
                else:
                    num = None
            except (ValueError, OverflowError):
                # a non-finite ts, or an int too large for a float: unusable, never fatal
                st.samples_bad += 1
                continue
            bad = q == _BAD
            if bad:
                st.samples_bad += 1

            g = t.group
            if g is not None and (bad or num is not None):
                k = ts_ms // g.len_ms
                wm = g.watermark
                if wm is not None and k < wm:
                    st.samples_late += 1
                else:
                    acc = t.cur_acc
                    if acc is None or k != t.cur_k:
                        accs = g.open.get(k)
                        if accs is None:
                            accs = g.open[k] = {}
                        acc = accs.get(t.name)
                        if acc is None:
                            acc = accs[t.name] = _Acc()
                        t.cur_k = k
                        t.cur_acc = acc
                    if bad:
                        acc.bad += 1
                    elif num is not None:
                        acc.add(num)

            if t.raw:
                sent_ms = t.sent_ms
                # The raw stream of a tag moves forward in time; an older sample is not news.
                if sent_ms is None or ts_ms >= sent_ms:
                    if t.latest_ms is None or ts_ms >= t.latest_ms:
                        t.latest_ms = ts_ms
                        t.latest_v = v
                        t.latest_num = dnum
                        t.latest_q = q
                    if t.changed(v, dnum, q, ts_ms):
                        out.append(t.raw_message(v, dnum, q, ts_ms))
                        st.raw_out += 1

            if t.rules and not bad and num is not None:
                for r in t.rules:
                    st.events_out += r.feed(num, v, ts_ms, out)

            # Models see every sample of their tags, bad ones too: a bad value spoils its row.
            for m in t.models:
                m.feed(t.name, v, ts_ms, quality=q, out=out)
        return out

    def tick(self, now: float) -> list[Outgoing]:
        """Close every window whose end <= now (less grace); send heartbeats that are due."""
        now_ms = _ms(now)
        out: list[Outgoing] = []
        close_ms = now_ms - self._grace_ms
        for g in self._groups:
            wm = close_ms // g.len_ms
            if g.watermark is not None and wm <= g.watermark:
                continue
            g.watermark = wm
            for k in sorted(k for k in g.open if k < wm):
                msg = g.close(k, partial=self._before_start(k, g))
                if msg is not None:
                    out.append(msg)
        self._stats.summaries_out += len(out)
        for t in self._hb_tags:
            sent_ms = t.sent_ms
            latest_ms = t.latest_ms
            hb_ms = t.hb_ms
            if (
                sent_ms is not None
                and latest_ms is not None
                and hb_ms is not None
                and latest_ms > sent_ms
                and now_ms - sent_ms >= hb_ms
            ):
                # The newest value, with its own ts; a value already sent is never repeated.
                out.append(t.raw_message(t.latest_v, t.latest_num, t.latest_q, latest_ms))
                self._stats.raw_out += 1
        return out

    def _before_start(self, k: int, g: _Group) -> bool:
        return self._started_ms is not None and k * g.len_ms < self._started_ms

    def flush(self, now: float) -> list[Outgoing]:
        """At shutdown: summarise every open window (partial if its end > now) and send each raw
        tag's newest unsent value, so that nothing the stage holds is left behind."""
        now_ms = _ms(now)
        out: list[Outgoing] = []
        for g in self._groups:
            complete_below = now_ms // g.len_ms
            wm = complete_below if g.watermark is None else max(g.watermark, complete_below)
            for k in sorted(g.open):
                msg = g.close(k, partial=k >= complete_below or self._before_start(k, g))
                if msg is not None:
                    out.append(msg)
                wm = max(wm, k + 1)
            # Whatever comes after a flush for these windows is late, never a second summary.
            g.watermark = wm
        self._stats.summaries_out += len(out)
        for t in self._raw_tags:
            if t.latest_ms is not None and t.sent_ms is not None and t.latest_ms > t.sent_ms:
                out.append(t.raw_message(t.latest_v, t.latest_num, t.latest_q, t.latest_ms))
                self._stats.raw_out += 1
        return out

    def stats(self) -> EdgeStats:
        out = replace(self._stats)
        for m in self._models:
            ms = m.stats()
            out.model_samples_bad += ms.samples_bad
            out.model_rows += ms.rows
            out.model_rows_dropped += ms.rows_dropped
            out.model_inferences += ms.inferences
            out.model_errors += ms.errors
            out.model_events += ms.events
            out.model_time_s += ms.time_s
            out.events_out += ms.events
        return out

    @property
    def models(self) -> tuple[ModelRunner, ...]:
        """The runners of the bound models, in config order."""
        return self._models

    def model_stats(self) -> dict[str, ModelStats]:
        """A snapshot of each bound model's counters, by model name."""
        return {m.name: m.stats() for m in self._models}
