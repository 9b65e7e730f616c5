"""The PostgreSQL store: one database shared by several replicas (``state.url``).

The same :class:`~daemon.store.base.Store` interface as SQLite, run the same way (synchronous
calls on the store's own thread, :class:`~daemon.store.base.StoreRunner`), through psycopg 3
and its connection pool, which reconnects after the server restarts. On top of it, what
several replicas need:

- **Leases on watches.** Each watch is polled by the replica named in ``holder`` until
  ``lease_until``; its holder renews the lease every third of ``state.lease_ttl_s``. A replica
  claims unheld or lapsed watches in batches (``FOR UPDATE SKIP LOCKED``: two replicas never
  claim the same row) up to its share of the active watches, and releases what it holds
  above its share so that a new replica gets work. Writes of a poll are fenced: a replica that
  lost a watch's lease cannot overwrite the new holder's cursor.
- **Claims on deliveries.** A sink's due deliveries are claimed the same way before they are
  sent, so each event goes to each sink once across the fleet; only a delivery in flight when
  its replica dies is sent again (after the TTL, by another replica, with the same event id).
- **Exactly one event per reply.** Event ids are deterministic and unique in ``events``: two
  replicas that both saw a reply (one just took the watch over) store it once.

Lease times use the database's clock, so replicas with skewed clocks agree on who holds what.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from daemon.errors import ConfigError
from daemon.events import Event
from daemon.settings import url_password
from daemon.store.base import DeadLetter, Delivery, PollRecord, StoreError, WatchRow, poll_values

SCHEMA_VERSION = 1
#: how long a store call waits for a connection while the server is unreachable
POOL_TIMEOUT_S = 5.0
#: one key for pg_advisory_xact_lock: schema creation and config syncs run one at a time
_LOCK_KEY = 0x7161_7761_7463_68  # "qawatch"

SCHEMA = """
CREATE TABLE IF NOT EXISTS qawatch_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS watches (
    short_id     TEXT PRIMARY KEY,
    in_config    SMALLINT NOT NULL DEFAULT 0,
    in_runtime   SMALLINT NOT NULL DEFAULT 0,
    state        TEXT NOT NULL DEFAULT 'active',
    reason       TEXT,
    backfill     TEXT NOT NULL DEFAULT 'latest',
    started_at   DOUBLE PRECISION NOT NULL,
    ended_at     DOUBLE PRECISION,
    detector     TEXT,
    interval_s   DOUBLE PRECISION,
    errors       INTEGER NOT NULL DEFAULT 0,
    last_poll_at DOUBLE PRECISION,
    last_status  TEXT,
    next_poll_at DOUBLE PRECISION,
    holder       TEXT,
    lease_until  DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS watches_holder ON watches (holder);
CREATE TABLE IF NOT EXISTS events (
    seq        BIGSERIAL PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    type       TEXT NOT NULL,
    short_id   TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    body       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_seq       BIGINT NOT NULL REFERENCES events(seq),
    sink            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    enqueued_at     DOUBLE PRECISION NOT NULL,
    last_error      TEXT,
    updated_at      DOUBLE PRECISION NOT NULL,
    claimed_by      TEXT,
    claim_until     DOUBLE PRECISION,
    PRIMARY KEY (event_seq, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS replicas (
    id      TEXT PRIMARY KEY,
    seen_at DOUBLE PRECISION NOT NULL
);
"""

WATCH_COLUMNS = (
    "short_id, in_config, in_runtime, state, reason, backfill, started_at, ended_at, detector,"
    " interval_s, errors, last_poll_at, last_status, next_poll_at, holder"
)
#: the database's clock, in Unix seconds
DB_NOW = "extract(epoch from clock_timestamp())::double precision"

_GET = f"SELECT {WATCH_COLUMNS} FROM watches WHERE short_id = %s"  # noqa: S608 - constant columns

_UPDATE_POLL = (
    "UPDATE watches SET detector = COALESCE(%s, detector), interval_s = %s, errors = %s,"
    " last_poll_at = %s, last_status = %s, next_poll_at = %s"
    " WHERE short_id = %s AND state = 'active' AND (%s::double precision IS NULL OR started_at = %s)"
    # fenced: only the lease holder writes (a replica that lost the lease must not move the cursor)
    " AND holder = %s"
)

_RESTART = (
    "UPDATE watches SET state = 'active', reason = NULL, ended_at = NULL, started_at = %s,"
    " backfill = %s, errors = 0, detector = NULL, interval_s = NULL"
    " WHERE state = 'ended' AND "
)


def _row(values: Sequence[Any]) -> WatchRow:
    return WatchRow(*values)


class PostgresStore:
    """A :class:`~daemon.store.base.Store` in PostgreSQL, shared by the replicas that name it."""

    def __init__(self, url: str, replica: str, lease_ttl_s: float = 15.0, *, pool_size: int = 2) -> None:
        self.url = url
        self.replica = replica
        self.lease_ttl_s = lease_ttl_s
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None

    # -- connections -----------------------------------------------------------------

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            raise RuntimeError("PostgresStore.open() was not called")
        return self._pool

    def open(self) -> None:
        # the pool logs every failed reconnection attempt; qawatch logs an outage once itself
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
        try:  # one plain connection first: its error says what is wrong (password, database...)
            psycopg.connect(self.url, connect_timeout=5).close()
        except psycopg.Error as exc:
            raise ConfigError(f"config error: state.url: cannot connect: {_reason(exc, self.url)}") from None
        pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            check=ConnectionPool.check_connection,  # a server restart: a fresh connection, not an error
            timeout=POOL_TIMEOUT_S,  # a store call waits this long for a connection, then fails
            kwargs={"application_name": f"qawatch {self.replica}"[:63], "connect_timeout": 5},
            name="qawatch-store",
        )
        try:
            pool.open(wait=True, timeout=10.0)
        except psycopg.Error as exc:  # psycopg_pool.PoolTimeout too: the server did not answer
            pool.close()
            raise ConfigError(f"config error: state.url: cannot connect: {_reason(exc, self.url)}") from None
        self._pool = pool
        try:
            version = self._migrate()
        except psycopg.Error as exc:
            self.close()
            raise ConfigError(
                f"config error: state.url: cannot use the database: {_reason(exc, self.url)}"
            ) from None
        if version > SCHEMA_VERSION:
            self.close()
            raise ConfigError(
                f"config error: state.url: the database was written by a newer qawatch "
                f"(schema {version}); upgrade qawatch"
            )

    def _migrate(self) -> int:
        """Create the schema (one replica at a time); the version found before."""
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            exists = conn.execute("SELECT to_regclass('qawatch_schema') IS NOT NULL").fetchone()
            version = 0
            if exists and exists[0]:
                found = conn.execute("SELECT max(version) FROM qawatch_schema").fetchone()
                version = int(found[0]) if found and found[0] is not None else 0
            if version > SCHEMA_VERSION:
                return version
            conn.execute(SCHEMA)
            if version < SCHEMA_VERSION:
                conn.execute("DELETE FROM qawatch_schema")
                conn.execute("INSERT INTO qawatch_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        return version

    def close(self) -> None:
        """Close the pool; safe from any thread (a call waiting for a connection then fails)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a transaction (committed when the block ends); the driver's
        errors, a lost connection or no connection within the pool's timeout, come out as
        :class:`StoreError` (one line, no credentials)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:  # psycopg_pool.PoolTimeout is one too
            raise StoreError(_reason(exc, self.url)) from exc

    def _one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._conn() as conn:
            return conn.execute(sql, args).fetchone()

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(sql, args).fetchall()

    # -- watches -----------------------------------------------------------------------

    def get_watch(self, short_id: str) -> WatchRow | None:
        row = self._one(_GET, (short_id,))
        return None if row is None else _row(row)

    def watches(self, *, active_only: bool = False, ended_only: bool = False) -> list[WatchRow]:
        where = "WHERE state = 'active'" if active_only else "WHERE state = 'ended'" if ended_only else ""
        return [_row(r) for r in self._all(f"SELECT {WATCH_COLUMNS} FROM watches {where} ORDER BY short_id")]  # noqa: S608

    def active_watches_page(self, after: int, limit: int) -> tuple[list[WatchRow], int]:
        """Pages of every active watch (for tools; the daemon claims its share instead)."""
        rows = self._all(
            f"SELECT {WATCH_COLUMNS} FROM watches WHERE state = 'active'"  # noqa: S608 - constant columns
            " ORDER BY short_id OFFSET %s LIMIT %s",
            (after, limit),
        )
        return [_row(r) for r in rows], after + len(rows)

    def watch_counts(self) -> dict[str, int]:
        return {state: int(n) for state, n in self._all("SELECT state, COUNT(*) FROM watches GROUP BY state")}

    def sync_config_watches(self, ids: Sequence[str], backfill: str, now: float) -> list[WatchRow]:
        """As :meth:`SqliteStore.sync_config_watches`, set-wise (one array parameter), one
        replica at a time: replicas starting together do not interleave their syncs."""
        wanted = list(dict.fromkeys(ids))
        with self._conn() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(
                "UPDATE watches SET in_config = 1 WHERE in_config = 0 AND short_id = ANY(%s)", (wanted,)
            )
            conn.execute(
                "INSERT INTO watches (short_id, in_config, backfill, started_at)"
                " SELECT w, 1, %s, %s FROM unnest(%s::text[]) AS w ON CONFLICT (short_id) DO NOTHING",
                (backfill, now, wanted),
            )
            conn.execute(_RESTART + "reason = 'removed' AND short_id = ANY(%s)", (now, backfill, wanted))
            conn.execute(
                "UPDATE watches SET in_config = 0 WHERE in_config = 1 AND NOT (short_id = ANY(%s))", (wanted,)
            )
            rows = conn.execute(
                f"SELECT {WATCH_COLUMNS} FROM watches WHERE state = 'active'"  # noqa: S608 - constant SQL
                " AND in_config = 0 AND in_runtime = 0"
            ).fetchall()
        return [_row(r) for r in rows]

    def add_runtime_watch(self, short_id: str, backfill: str, now: float) -> WatchRow:
        """Watch ``short_id`` from the runtime source (an ended watch starts again); a watch
        that nobody holds is leased to this replica at once."""
        ttl = self.lease_ttl_s
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO watches (short_id, in_runtime, backfill, started_at) VALUES (%s, 1, %s, %s)"
                " ON CONFLICT (short_id) DO UPDATE SET in_runtime = 1",
                (short_id, backfill, now),
            )
            conn.execute(_RESTART + "short_id = %s", (now, backfill, short_id))
            conn.execute(
                f"UPDATE watches SET holder = %s, lease_until = {DB_NOW} + %s"  # noqa: S608 - constant SQL
                f" WHERE short_id = %s AND state = 'active' AND (holder IS NULL OR lease_until < {DB_NOW})",
                (self.replica, ttl, short_id),
            )
            row = conn.execute(_GET, (short_id,)).fetchone()
        assert row is not None
        return _row(row)

    def remove_runtime_watch(self, short_id: str) -> WatchRow | None:
        with self._conn() as conn:
            conn.execute("UPDATE watches SET in_runtime = 0 WHERE short_id = %s", (short_id,))
            row = conn.execute(_GET, (short_id,)).fetchone()
        return None if row is None else _row(row)

    # -- leases ------------------------------------------------------------------------

    def heartbeat(self) -> int:
        """Say this replica is alive; the number of live replicas (seen within the TTL)."""
        ttl = self.lease_ttl_s
        with self._conn() as conn:
            conn.execute(
                f"INSERT INTO replicas (id, seen_at) VALUES (%s, {DB_NOW})"  # noqa: S608 - constant SQL
                " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                (self.replica,),
            )
            conn.execute(f"DELETE FROM replicas WHERE seen_at < {DB_NOW} - %s", (10 * ttl,))  # noqa: S608
            row = conn.execute(
                f"SELECT COUNT(*) FROM replicas WHERE seen_at >= {DB_NOW} - %s",  # noqa: S608 - constant SQL
                (ttl,),
            ).fetchone()
        return max(1, int(row[0])) if row else 1

    def renew_leases(self) -> set[str]:
        """Extend this replica's leases (watches and deliveries it claimed); the watches it
        still holds. One it lost (lapsed and taken, or ended) is no longer in the set."""
        ttl = self.lease_ttl_s
        with self._conn() as conn:
            held = conn.execute(
                f"UPDATE watches SET lease_until = {DB_NOW} + %s"  # noqa: S608 - constant SQL
                " WHERE holder = %s AND state = 'active' RETURNING short_id",
                (ttl, self.replica),
            ).fetchall()
            conn.execute(
                f"UPDATE deliveries SET claim_until = {DB_NOW} + %s"  # noqa: S608 - constant SQL
                " WHERE claimed_by = %s AND state = 'pending'",
                (ttl, self.replica),
            )
        return {short_id for (short_id,) in held}

    def claim_watches(self, limit: int) -> list[WatchRow]:
        """Lease up to ``limit`` active watches that nobody holds or whose lease lapsed."""
        if limit <= 0:
            return []
        rows = self._all(
            f"UPDATE watches w SET holder = %s, lease_until = {DB_NOW} + %s"  # noqa: S608 - constant SQL
            " FROM (SELECT short_id FROM watches WHERE state = 'active'"
            f" AND (holder IS NULL OR lease_until < {DB_NOW})"
            " ORDER BY short_id LIMIT %s FOR UPDATE SKIP LOCKED) free"
            " WHERE w.short_id = free.short_id RETURNING "
            + ", ".join(f"w.{c.strip()}" for c in WATCH_COLUMNS.split(",")),
            (self.replica, self.lease_ttl_s, limit),
        )
        return [_row(r) for r in rows]

    def release_watches(self, short_ids: Iterable[str]) -> int:
        """Give up this replica's leases on ``short_ids`` (another replica takes them at once)."""
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE watches SET holder = NULL, lease_until = NULL"
                " WHERE holder = %s AND short_id = ANY(%s)",
                (self.replica, list(short_ids)),
            )
            return cur.rowcount

    def release_all(self) -> None:
        """At shutdown: every lease and delivery claim of this replica, so others need not
        wait for the TTL; and this replica leaves the live set."""
        with self._conn() as conn:
            conn.execute(
                "UPDATE watches SET holder = NULL, lease_until = NULL WHERE holder = %s", (self.replica,)
            )
            conn.execute(
                "UPDATE deliveries SET claimed_by = NULL, claim_until = NULL WHERE claimed_by = %s",
                (self.replica,),
            )
            conn.execute("DELETE FROM replicas WHERE id = %s", (self.replica,))

    def holders(self) -> dict[str | None, int]:
        """Active watches by the replica holding them (None: not held)."""
        rows = self._all("SELECT holder, COUNT(*) FROM watches WHERE state = 'active' GROUP BY holder")
        return {holder: int(n) for holder, n in rows}

    # -- polls and events --------------------------------------------------------------

    def _insert_event(
        self, conn: psycopg.Connection[Any], event: Event, sinks: Iterable[str], now: float
    ) -> bool:
        row = conn.execute(
            "INSERT INTO events (id, type, short_id, created_at, body) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING seq",
            (event.id, event.type, event.short_id, now, event.to_json()),
        ).fetchone()
        if row is None:
            return False  # already recorded once: never again
        seq = row[0]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO deliveries (event_seq, sink, next_attempt_at, enqueued_at, updated_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                [(seq, sink, now, now, now) for sink in sinks],
            )
        return True

    def _poll_values(self, record: PollRecord) -> tuple[object, ...]:
        return (*poll_values(record), self.replica)  # the fence: only the lease holder writes

    def save_poll(self, record: PollRecord, events: Sequence[tuple[Event, Sequence[str]]]) -> list[str]:
        return self.save_polls([(record, events)])[0]

    def save_polls(
        self, polls: Sequence[tuple[PollRecord, Sequence[tuple[Event, Sequence[str]]]]]
    ) -> list[list[str]]:
        news: list[list[str]] = []
        with self._conn() as conn:
            for record, events in polls:
                news.append(
                    [
                        event.id
                        for event, sinks in events
                        if self._insert_event(conn, event, sinks, record.last_poll_at)
                    ]
                )
            with conn.cursor() as cur:
                cur.executemany(_UPDATE_POLL, [self._poll_values(record) for record, _ in polls])
        return news

    def save_poll_times(self, records: Sequence[PollRecord]) -> None:
        if not records:
            return
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany(_UPDATE_POLL, [self._poll_values(r) for r in records])

    def end_watch(
        self, short_id: str, reason: str, now: float, event: tuple[Event, Sequence[str]] | None
    ) -> bool:
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE watches SET state = 'ended', reason = %s, ended_at = %s, next_poll_at = NULL,"
                " holder = NULL, lease_until = NULL WHERE short_id = %s AND state = 'active'",
                (reason, now, short_id),
            )
            if cur.rowcount == 0:
                return False
            if event is not None:
                self._insert_event(conn, event[0], event[1], now)
        return True

    # -- deliveries --------------------------------------------------------------------

    def due_deliveries(self, sink: str, now: float, limit: int = 100) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries of ``sink`` for this replica (none that another
        live replica claimed), oldest first."""
        rows = self._all(
            f"WITH due AS (SELECT event_seq FROM deliveries WHERE sink = %s AND state = 'pending'"  # noqa: S608
            f" AND next_attempt_at <= %s AND (claim_until IS NULL OR claim_until < {DB_NOW}"
            " OR claimed_by = %s) ORDER BY event_seq LIMIT %s FOR UPDATE SKIP LOCKED),"
            f" claimed AS (UPDATE deliveries d SET claimed_by = %s, claim_until = {DB_NOW} + %s"
            " FROM due WHERE d.event_seq = due.event_seq AND d.sink = %s"
            " RETURNING d.event_seq, d.attempts, d.enqueued_at)"
            " SELECT e.seq, e.id, e.body, c.attempts, c.enqueued_at FROM claimed c"
            " JOIN events e ON e.seq = c.event_seq ORDER BY e.seq",
            (sink, now, self.replica, limit, self.replica, self.lease_ttl_s, sink),
        )
        return [Delivery(*row) for row in rows]

    def next_delivery_at(self, sink: str) -> float | None:
        row = self._one(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE sink = %s AND state = 'pending'", (sink,)
        )
        return float(row[0]) if row and row[0] is not None else None

    def mark_delivered(self, seq: int, sink: str, now: float) -> None:
        self.mark_delivered_many([seq], sink, now)

    def mark_delivered_many(self, seqs: Sequence[int], sink: str, now: float) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_error = NULL,"
                " updated_at = %s, claimed_by = NULL, claim_until = NULL"
                " WHERE sink = %s AND event_seq = ANY(%s)",
                (now, sink, list(seqs)),
            )

    def mark_retry(self, seq: int, sink: str, next_at: float, error: str, now: float) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s,"
                " updated_at = %s, claimed_by = NULL, claim_until = NULL WHERE event_seq = %s AND sink = %s"
                # fenced: a replica whose claim lapsed (and was taken) must not touch the new claim
                " AND state = 'pending' AND claimed_by = %s",
                (next_at, error, now, seq, sink, self.replica),
            )

    def mark_dead(self, seq: int, sink: str, error: str, now: float) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = %s,"
                " updated_at = %s, claimed_by = NULL, claim_until = NULL WHERE event_seq = %s AND sink = %s"
                " AND state = 'pending' AND claimed_by = %s",
                (error, now, seq, sink, self.replica),
            )

    def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        rows = self._all(
            "SELECT e.id, e.type, e.short_id, d.sink, d.attempts, d.last_error, e.created_at, d.updated_at"
            " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " WHERE d.state = 'dead' AND (%s::text IS NULL OR d.sink = %s) ORDER BY e.seq, d.sink",
            (sink, sink),
        )
        return [DeadLetter(*row) for row in rows]

    def replay_dead(
        self, now: float, *, sink: str | None = None, event_id: str | None = None, since: float | None = None
    ) -> int:
        with self._conn() as conn:
            cur = conn.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s,"
                " enqueued_at = %s, updated_at = %s, claimed_by = NULL, claim_until = NULL"
                " WHERE state = 'dead' AND (%s::text IS NULL OR sink = %s) AND event_seq IN"
                " (SELECT seq FROM events WHERE (%s::text IS NULL OR id = %s)"
                " AND (%s::double precision IS NULL OR created_at >= %s))",
                (now, now, now, sink, sink, event_id, event_id, since, since),
            )
            return cur.rowcount

    def prune(self, cutoff: float) -> tuple[int, int]:
        with self._conn() as conn:
            gone = conn.execute(
                "DELETE FROM deliveries WHERE state = 'delivered' AND updated_at < %s", (cutoff,)
            ).rowcount
            emptied = conn.execute(
                "UPDATE events SET body = '' WHERE created_at < %s AND body != ''"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq)",
                (cutoff,),
            ).rowcount
        return gone, emptied

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        return {
            (sink, state): int(n)
            for sink, state, n in self._all(
                "SELECT sink, state, COUNT(*) FROM deliveries GROUP BY sink, state"
            )
        }


def _reason(exc: BaseException, url: str) -> str:
    """A driver error in one line, without the URL's password should the message quote it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    secret = url_password(url)
    if secret:
        text = text.replace(secret, "***")
    return text[:200]
