"""`qawatch dead-letters list|replay`: read and requeue what a sink gave up on.

Works on the state file directly (SQLite allows it while the daemon runs); a running daemon
picks replayed deliveries up within a few seconds. Replay keeps each event's id, so a
receiver that deduplicates on ``webhook-id`` stays correct.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from daemon.durations import UNITS, parse_duration
from daemon.errors import ConfigError, ExitCode
from daemon.events import shown_time
from daemon.store import DeadLetter, SqliteStore


def parse_since(text: str, now: float) -> float:
    """``30m``, ``2h``, ``1d`` ago, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if text.strip()[-1:] in UNITS:  # a duration needs its unit here: a bare number is no date
        try:
            return now - parse_duration(text)
        except ValueError:
            pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"qawatch: --since: {text!r} is neither a duration (30m, 2h, 1d) nor an ISO 8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def open_existing(path: Path) -> SqliteStore:
    if not path.exists():
        raise ConfigError(f"config error: state.path: no state file at {path}")
    store = SqliteStore(path)
    store.open()
    return store


def format_table(rows: Sequence[DeadLetter], now: float) -> str:
    header = ("EVENT ID", "TYPE", "CONVERSATION", "SINK", "ATTEMPTS", "DEAD SINCE", "LAST ERROR")
    lines = [header] + [
        (
            r.event_id,
            r.event_type,
            r.short_id,
            r.sink,
            str(r.attempts),
            shown_time(r.dead_at, now),
            (r.last_error or "")[:80],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


def list_dead(path: Path, sink: str | None, out: TextIO, *, as_json: bool = False) -> int:
    """The dead letters as a table, or with ``as_json`` as a JSON list (times in Unix seconds,
    like ``qawatch list --json``)."""
    store = open_existing(path)
    try:
        rows = store.dead_letters(sink)
    finally:
        store.close()
    if as_json:
        out.write(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    elif not rows:
        out.write("no dead letters\n")
    else:
        out.write(format_table(rows, time.time()) + "\n")
    return ExitCode.OK


def replay(
    path: Path,
    *,
    sink: str | None,
    event_id: str | None,
    since: str | None,
    out: TextIO,
) -> int:
    now = time.time()
    since_ts = parse_since(since, now) if since is not None else None
    store = open_existing(path)
    try:
        count = store.replay_dead(now, sink=sink, event_id=event_id, since=since_ts)
    finally:
        store.close()
    if event_id is not None and count == 0:
        raise ConfigError(
            f"qawatch: no dead letter with id {event_id}" + (f" for sink {sink}" if sink else "")
        )
    out.write(f"replayed {count} dead letter{'s' if count != 1 else ''}\n")
    return ExitCode.OK
