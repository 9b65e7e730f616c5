"""Sinks: where events go. Each is a small object with ``open``, ``send`` and ``close``.

A sink gets an event's id and its exact JSON text (what the store recorded); it raises
:class:`~daemon.errors.SinkError` when the event was not taken, and the outbox worker
retries it later. Building a sink does no I/O; ``open`` does.
"""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from daemon.settings import (
    FileSinkSettings,
    Settings,
    StdoutSinkSettings,
    WebhookSinkSettings,
    sink_names,
)
from daemon.sinks.file import FileSink
from daemon.sinks.stdout import StdoutSink
from daemon.sinks.webhook import WebhookSink


@runtime_checkable
class Sink(Protocol):
    name: str
    events: frozenset[str] | None
    max_concurrency: int
    max_age_s: float | None
    remote: bool

    def retry_delay(self, attempts: int, rng: random.Random) -> float | None: ...
    async def open(self) -> None: ...
    async def send(self, event_id: str, body: str) -> None: ...
    async def reopen(self) -> None: ...
    async def close(self) -> None: ...


def accepts(sink: Sink, event_type: str) -> bool:
    """Whether ``sink`` wants events of ``event_type`` (its ``events:`` filter)."""
    return sink.events is None or event_type in sink.events


def build_sinks(settings: Settings) -> list[Sink]:
    sinks: list[Sink] = []
    for index, (name, config) in enumerate(zip(sink_names(settings), settings.sinks, strict=True)):
        events = frozenset(config.events) if config.events is not None else None
        if isinstance(config, StdoutSinkSettings):
            sinks.append(StdoutSink(name, events=events))
        elif isinstance(config, FileSinkSettings):
            sinks.append(
                FileSink(name, config.path, fsync=config.fsync, events=events, key=f"sinks.{index}.path")
            )
        elif isinstance(config, WebhookSinkSettings):
            sinks.append(
                WebhookSink(
                    name,
                    config.url,
                    secrets=config.secrets(),
                    secret_file=config.secret_file,
                    headers=config.headers,
                    timeout_s=config.timeout_s,
                    retry_schedule_s=config.retry_schedule_s,
                    max_age_s=config.max_age_s,
                    max_concurrency=config.max_concurrency,
                    events=events,
                    key=f"sinks.{index}",
                )
            )
    return sinks
