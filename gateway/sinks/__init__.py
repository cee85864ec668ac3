"""Fog sinks behind one small contract; `make_sink` picks one by URL scheme (paho only for MQTT)."""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.config.models import MqttOptions
from gateway.errors import UplinkError
from gateway.sinks.base import OutMessage, Sink, SinkListener, redact_url, sqlite_path

__all__ = ["OutMessage", "Sink", "SinkListener", "make_sink", "redact_url", "sqlite_path"]


def make_sink(
    url: str,
    listener: SinkListener,
    *,
    site: str,
    gateway_id: str,
    mqtt: MqttOptions | None = None,
    password: str | None = None,
) -> Sink:
    """The sink for `sqlite:///path`, `mqtt://host:port` or `mqtts://host:port`."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from gateway.sinks.sqlite import SqliteSink

        return SqliteSink(url, listener)
    if scheme in ("mqtt", "mqtts"):
        from gateway.sinks.mqtt import MqttSink

        return MqttSink(
            url,
            listener,
            options=mqtt or MqttOptions(),
            site=site,
            gateway_id=gateway_id,
            password=password,
        )
    raise UplinkError(f"unknown fog sink scheme {scheme!r} in {redact_url(url)}")
