"""The default :class:`~daemon.store.base.Store`: one SQLite file in WAL mode.

An event and its per-sink delivery rows are inserted in the same ``BEGIN IMMEDIATE``
transaction as the poll's detector state; an event id the ``events`` table already holds is
ignored (``INSERT OR IGNORE``), so it is never stored (or delivered) again.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError
from daemon.events import Event
from daemon.store.base import DeadLetter, Delivery, PollRecord, WatchRow, poll_values

SCHEMA = """
CREATE TABLE IF NOT EXISTS watches (
    short_id     TEXT PRIMARY KEY,
    in_config    INTEGER NOT NULL DEFAULT 0,
    in_runtime   INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'active',
    reason       TEXT,
    backfill     TEXT NOT NULL DEFAULT 'latest',
    started_at   REAL NOT NULL,
    ended_at     REAL,
    detector     TEXT,
    interval_s   REAL,
    errors       INTEGER NOT NULL DEFAULT 0,
    last_poll_at REAL,
    last_status  TEXT,
    next_poll_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    short_id   TEXT NOT NULL,
    created_at REAL NOT NULL,
    body       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_seq       INTEGER NOT NULL REFERENCES events(seq),
    sink            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    enqueued_at     REAL NOT NULL,
    last_error      TEXT,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (event_seq, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, state, next_attempt_at);
PRAGMA user_version = 1;
"""
#: bump with a migration in :meth:`SqliteStore.open` when the schema changes
SCHEMA_VERSION = 1

WATCH_COLUMNS = (
    "short_id, in_config, in_runtime, state, reason, backfill, started_at, ended_at, detector,"
    " interval_s, errors, last_poll_at, last_status, next_poll_at, NULL"  # no holder: one process
)


_UPDATE_POLL = (
    "UPDATE watches SET detector = COALESCE(?, detector), interval_s = ?, errors = ?,"
    " last_poll_at = ?, last_status = ?, next_poll_at = ?"
    # a watch that ended, or ended and started again, since the poll began is not touched
    " WHERE short_id = ? AND state = 'active' AND (? IS NULL OR started_at = ?)"
)


class SqliteStore:
    """The default :class:`~daemon.store.base.Store`: one SQLite file in WAL mode."""

    #: how long a write waits for another process's lock (e.g. `qawatch dead-letters replay`)
    busy_timeout_ms = 5000

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore.open() was not called")
        return self._db

    def open(self) -> None:
        if not self.path.parent.is_dir():
            raise ConfigError(f"config error: state.path: folder {self.path.parent} does not exist")
        try:
            # create it private: it holds conversation texts (SQLite gives -wal/-shm the same mode)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise ConfigError(f"config error: state.path: cannot open {self.path}: {exc.strerror}") from None
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                db.close()
                raise ConfigError(
                    f"config error: state.path: {self.path} was written by a newer qawatch "
                    f"(schema {version}); upgrade qawatch"
                )
            db.executescript(SCHEMA)
            # a damaged page surfaces only when it is read, which would be later, mid-run;
            # check every page now (about a second per few hundred MB)
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            raise ConfigError(f"config error: state.path: cannot use {self.path}: {exc}") from None
        if problem != "ok":
            db.close()
            raise ConfigError(
                f"config error: state.path: {self.path} is damaged ({' '.join(str(problem).split())[:160]}); "
                "restore it from a backup, or move it away to start with an empty state"
            )
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- watches -----------------------------------------------------------------------

    def _row(self, row: Any) -> WatchRow | None:
        return None if row is None else WatchRow._make(row)

    def get_watch(self, short_id: str) -> WatchRow | None:
        sql = f"SELECT {WATCH_COLUMNS} FROM watches WHERE short_id = ?"  # noqa: S608 - constant columns
        cur = self.db.execute(sql, (short_id,))
        return self._row(cur.fetchone())

    def watches(self, *, active_only: bool = False, ended_only: bool = False) -> list[WatchRow]:
        where = "WHERE state = 'active'" if active_only else "WHERE state = 'ended'" if ended_only else ""
        cur = self.db.execute(f"SELECT {WATCH_COLUMNS} FROM watches {where} ORDER BY short_id")  # noqa: S608 - constant SQL
        return list(map(WatchRow._make, cur))

    def active_watches_page(self, after: int, limit: int) -> tuple[list[WatchRow], int]:
        """Up to ``limit`` active watches after the position ``after`` (0: from the start), and
        the position to continue from: start-up loads the watch set a page at a time and polls
        meanwhile. Pages follow the table's own order (rowid), as fast as one full scan."""
        cur = self.db.execute(
            f"SELECT rowid, {WATCH_COLUMNS} FROM watches WHERE rowid > ? AND state = 'active'"  # noqa: S608 - constant columns
            " ORDER BY rowid LIMIT ?",
            (after, limit),
        )
        rows = cur.fetchall()
        return [WatchRow._make(row[1:]) for row in rows], (rows[-1][0] if rows else after)

    def sync_config_watches(self, ids: Sequence[str], backfill: str, now: float) -> list[WatchRow]:
        """Make the configured ids the config-sourced watches; return the watches that lost
        their last source (now ended as ``removed``; the caller emits their events).

        A handful of set-wise statements whatever the number of ids (100,000 in well under
        a second): the ids go in as one JSON array into a temporary table."""
        wanted = json.dumps(list(dict.fromkeys(ids)))
        with self._tx():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (short_id TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM temp.wanted")
            self.db.execute("INSERT OR IGNORE INTO temp.wanted SELECT value FROM json_each(?)", (wanted,))
            # only rows that change are written: a restart with 100,000 configured ids that
            # are all known already writes nothing here
            self.db.execute(
                "UPDATE watches SET in_config = 1 WHERE in_config = 0"
                " AND short_id IN (SELECT short_id FROM temp.wanted)"
            )
            self.db.execute(
                "INSERT INTO watches (short_id, in_config, backfill, started_at)"
                " SELECT short_id, 1, ?, ? FROM temp.wanted"
                " WHERE short_id NOT IN (SELECT short_id FROM watches)",
                (backfill, now),
            )
            # a watch ended only because it left the configuration starts again
            self._restart_where(
                "reason = 'removed' AND short_id IN (SELECT short_id FROM temp.wanted)", backfill, now
            )
            self.db.execute(
                "UPDATE watches SET in_config = 0 WHERE in_config = 1"
                " AND short_id NOT IN (SELECT short_id FROM temp.wanted)"
            )
            self.db.execute("DELETE FROM temp.wanted")
            cur = self.db.execute(
                f"SELECT {WATCH_COLUMNS} FROM watches WHERE state = 'active'"  # noqa: S608 - constant SQL
                " AND in_config = 0 AND in_runtime = 0"
            )
            return [row for row in map(self._row, cur.fetchall()) if row is not None]

    def _restart_where(self, condition: str, backfill: str, now: float, args: Sequence[object] = ()) -> None:
        """Start ended watches matching ``condition`` (constant SQL; values go in ``args``) again
        as new watches: what finished meanwhile is history (backfill), not a burst of events."""
        sql = (
            "UPDATE watches SET state = 'active', reason = NULL, ended_at = NULL, started_at = ?,"  # noqa: S608 - callers pass constant SQL
            " backfill = ?, errors = 0, detector = NULL, interval_s = NULL"
            " WHERE state = 'ended' AND " + condition
        )
        self.db.execute(sql, (now, backfill, *args))

    def add_runtime_watch(self, short_id: str, backfill: str, now: float) -> WatchRow:
        """Watch ``short_id`` from the runtime source; an ended watch starts again."""
        with self._tx():
            self.db.execute(
                "INSERT INTO watches (short_id, in_runtime, backfill, started_at) VALUES (?, 1, ?, ?)"
                " ON CONFLICT(short_id) DO UPDATE SET in_runtime = 1",
                (short_id, backfill, now),
            )
            self._restart_where("short_id = ?", backfill, now, (short_id,))
        row = self.get_watch(short_id)
        assert row is not None
        return row

    def remove_runtime_watch(self, short_id: str) -> WatchRow | None:
        """Forget the runtime source of ``short_id``; returns the row, or None if unknown."""
        with self._tx():
            self.db.execute("UPDATE watches SET in_runtime = 0 WHERE short_id = ?", (short_id,))
        return self.get_watch(short_id)

    # -- polls and events --------------------------------------------------------------

    def _insert_event(self, event: Event, sinks: Iterable[str], now: float) -> bool:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events (id, type, short_id, created_at, body) VALUES (?, ?, ?, ?, ?)",
            (event.id, event.type, event.short_id, now, event.to_json()),
        )
        if cur.rowcount == 0:
            return False  # already recorded once: never again
        seq = cur.lastrowid
        self.db.executemany(
            "INSERT INTO deliveries (event_seq, sink, next_attempt_at, enqueued_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [(seq, sink, now, now, now) for sink in sinks],
        )
        return True

    def save_poll(self, record: PollRecord, events: Sequence[tuple[Event, Sequence[str]]]) -> list[str]:
        """Record a poll's outcome and its events atomically; returns the ids of the events that
        were new to the store (an event recorded before is never recorded again)."""
        return self.save_polls([(record, events)])[0]

    def save_polls(
        self, polls: Sequence[tuple[PollRecord, Sequence[tuple[Event, Sequence[str]]]]]
    ) -> list[list[str]]:
        """:meth:`save_poll` for many polls in one transaction (a group commit: one fsync for
        all of them); returns each poll's new event ids, in order."""
        news: list[list[str]] = []
        with self._tx():
            for record, events in polls:
                new: list[str] = []
                for event, sinks in events:
                    if self._insert_event(event, sinks, record.last_poll_at):
                        new.append(event.id)
                news.append(new)
            self.db.executemany(_UPDATE_POLL, [poll_values(record) for record, _ in polls])
        return news

    def save_poll_times(self, records: Sequence[PollRecord]) -> None:
        """Write back what polls that found nothing new changed (times, intervals, the
        detector's bookkeeping), many at once."""
        with self._tx():
            self.db.executemany(_UPDATE_POLL, map(poll_values, records))  # no second list of them

    def end_watch(
        self, short_id: str, reason: str, now: float, event: tuple[Event, Sequence[str]] | None
    ) -> bool:
        """End an active watch with ``reason`` and record its event; False if not active."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE watches SET state = 'ended', reason = ?, ended_at = ?, next_poll_at = NULL"
                " WHERE short_id = ? AND state = 'active'",
                (reason, now, short_id),
            )
            if cur.rowcount == 0:
                return False
            if event is not None:
                self._insert_event(event[0], event[1], now)
        return True

    # -- deliveries --------------------------------------------------------------------

    def due_deliveries(self, sink: str, now: float, limit: int = 100) -> list[Delivery]:
        cur = self.db.execute(
            "SELECT e.seq, e.id, e.body, d.attempts, d.enqueued_at FROM deliveries d"
            " JOIN events e ON e.seq = d.event_seq"
            " WHERE d.sink = ? AND d.state = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY e.seq LIMIT ?",
            (sink, now, limit),
        )
        return [Delivery(*row) for row in cur.fetchall()]

    def next_delivery_at(self, sink: str) -> float | None:
        cur = self.db.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE sink = ? AND state = 'pending'",
            (sink,),
        )
        value = cur.fetchone()[0]
        return float(value) if value is not None else None

    def mark_delivered(self, seq: int, sink: str, now: float) -> None:
        self.db.execute(
            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_error = NULL,"
            " updated_at = ? WHERE event_seq = ? AND sink = ?",
            (now, seq, sink),
        )

    def mark_delivered_many(self, seqs: Sequence[int], sink: str, now: float) -> None:
        """:meth:`mark_delivered` for many, in one transaction."""
        with self._tx():
            self.db.executemany(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_error = NULL,"
                " updated_at = ? WHERE event_seq = ? AND sink = ?",
                [(now, seq, sink) for seq in seqs],
            )

    def mark_retry(self, seq: int, sink: str, next_at: float, error: str, now: float) -> None:
        self.db.execute(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,"
            " updated_at = ? WHERE event_seq = ? AND sink = ?",
            (next_at, error, now, seq, sink),
        )

    def mark_dead(self, seq: int, sink: str, error: str, now: float) -> None:
        self.db.execute(
            "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
            " updated_at = ? WHERE event_seq = ? AND sink = ?",
            (error, now, seq, sink),
        )

    def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        cur = self.db.execute(
            "SELECT e.id, e.type, e.short_id, d.sink, d.attempts, d.last_error, e.created_at, d.updated_at"
            " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " WHERE d.state = 'dead' AND (? IS NULL OR d.sink = ?) ORDER BY e.seq, d.sink",
            (sink, sink),
        )
        return [DeadLetter(*row) for row in cur.fetchall()]

    def replay_dead(
        self, now: float, *, sink: str | None = None, event_id: str | None = None, since: float | None = None
    ) -> int:
        """Put matching dead letters back in the queue, as new deliveries of the same event."""
        with self._tx():
            cur = self.db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " enqueued_at = ?, updated_at = ?"
                " WHERE state = 'dead' AND (? IS NULL OR sink = ?) AND event_seq IN"
                " (SELECT seq FROM events WHERE (? IS NULL OR id = ?) AND (? IS NULL OR created_at >= ?))",
                (now, now, now, sink, sink, event_id, event_id, since, since),
            )
            return cur.rowcount

    def prune(self, cutoff: float) -> tuple[int, int]:
        """Forget delivered deliveries older than ``cutoff`` and the text of events that no
        delivery needs any more. Event ids stay, so a reply is still never reported twice.
        Pending and dead deliveries (and their events) are kept. Returns (deliveries, events)."""
        with self._tx():
            gone = self.db.execute(
                "DELETE FROM deliveries WHERE state = 'delivered' AND updated_at < ?", (cutoff,)
            ).rowcount
            emptied = self.db.execute(
                "UPDATE events SET body = '' WHERE created_at < ? AND body != ''"
                " AND seq NOT IN (SELECT event_seq FROM deliveries)",
                (cutoff,),
            ).rowcount
        return gone, emptied

    def watch_counts(self) -> dict[str, int]:
        """Watches by state (``active``, ``ended``)."""
        cur = self.db.execute("SELECT state, COUNT(*) FROM watches GROUP BY state")
        return dict(cur.fetchall())

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        cur = self.db.execute("SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state")
        return {(sink, state): count for sink, state, count in cur.fetchall()}

    def _tx(self) -> _Transaction:
        return _Transaction(self.db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
