"""The SQLite store and the outbox worker on real files."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import reply_event as event

from daemon.errors import ConfigError
from daemon.events import Event, watch_ended_event
from daemon.outbox import SinkWorker
from daemon.sinks.base import backoff_delay
from daemon.sinks.memory import MemorySink
from daemon.store import PollRecord, SqliteStore, StoreRunner

NOW = 1_800_000_000.0


def poll(short_id: str = "chat_a", detector: str | None = '{"initialized":true}') -> PollRecord:
    return PollRecord(
        short_id=short_id,
        detector=detector,
        interval_s=2.0,
        errors=0,
        last_poll_at=NOW,
        last_status="settled",
        next_poll_at=NOW + 2,
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db")
    s.open()
    yield s
    s.close()


def test_opens_in_wal_mode_and_refuses_missing_folder(tmp_path: Path) -> None:
    """1. a store in an existing folder uses WAL 2. one in a missing folder is a config error
    naming state.path."""
    s = SqliteStore(tmp_path / "s.db")
    s.open()
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    with pytest.raises(ConfigError, match=r"state\.path"):
        SqliteStore(tmp_path / "nope" / "s.db").open()


def test_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    """1. state.path points at a text file 2. a one-line config error, not a traceback."""
    path = tmp_path / "s.db"
    path.write_text("this is not sqlite " * 100)
    with pytest.raises(ConfigError, match=r"state\.path"):
        SqliteStore(path).open()


def test_events_are_recorded_once_with_a_delivery_per_sink(store: SqliteStore) -> None:
    """1. a poll records two events for two sinks 2. the same events again add nothing
    3. each sink sees both, oldest first."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    pairs = [(event(1), ["stdout", "file"]), (event(2), ["stdout", "file"])]
    assert store.save_poll(poll(), pairs) == [event(1).id, event(2).id]
    assert store.save_poll(poll(), pairs) == []
    for sink in ("stdout", "file"):
        due = store.due_deliveries(sink, NOW)
        assert [d.event_id for d in due] == [event(1).id, event(2).id]
        assert Event.from_json(due[0].body) == event(1)
    assert store.delivery_counts() == {("file", "pending"): 2, ("stdout", "pending"): 2}


def test_state_survives_reopen(tmp_path: Path) -> None:
    """1. watches, detector state and a pending delivery are saved 2. the store is closed and
    opened again 3. all of it is there."""
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    s.open()
    s.sync_config_watches(["chat_a", "chat_b"], "none", NOW)
    s.save_poll(poll(), [(event(1), ["file"])])
    s.close()
    s2 = SqliteStore(path)
    s2.open()
    rows = {r.short_id: r for r in s2.watches()}
    assert set(rows) == {"chat_a", "chat_b"}
    assert rows["chat_a"].detector == '{"initialized":true}'
    assert rows["chat_a"].backfill == "none"
    assert rows["chat_a"].source == "config"
    assert [d.event_id for d in s2.due_deliveries("file", NOW)] == [event(1).id]
    s2.close()


def test_detector_state_is_kept_when_a_poll_fails(store: SqliteStore) -> None:
    """1. a successful poll saves detector state 2. a failed poll saves none 3. the state stays."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    store.save_poll(poll(detector='{"known":["x"]}'), [])
    store.save_poll(poll(detector=None), [])
    row = store.get_watch("chat_a")
    assert row is not None
    assert row.detector == '{"known":["x"]}'


def test_config_sync_adds_removes_and_keeps_runtime(store: SqliteStore) -> None:
    """1. config has a, b; runtime adds c 2. config becomes b only 3. a is orphaned (caller
    ends it), c stays 4. a comes back into config and starts again."""
    assert store.sync_config_watches(["chat_a", "chat_b"], "latest", NOW) == []
    store.add_runtime_watch("chat_c", "latest", NOW)
    orphans = store.sync_config_watches(["chat_b"], "latest", NOW + 1)
    assert [o.short_id for o in orphans] == ["chat_a"]
    assert store.end_watch("chat_a", "removed", NOW + 1, None)
    active = {r.short_id for r in store.watches(active_only=True)}
    assert active == {"chat_b", "chat_c"}
    store.sync_config_watches(["chat_a", "chat_b"], "latest", NOW + 2)
    row = store.get_watch("chat_a")
    assert row is not None
    assert row.active
    assert row.started_at == NOW + 2


def test_ended_watch_stays_ended_while_configured_until_added(store: SqliteStore) -> None:
    """1. a configured watch ends as not_found 2. a later sync keeps it ended 3. a runtime add
    starts it again."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    ended = watch_ended_event("chat_a", "not_found", NOW, datetime.fromtimestamp(NOW, UTC))
    assert store.end_watch("chat_a", "not_found", NOW, (ended, ["file"]))
    assert not store.end_watch("chat_a", "not_found", NOW, (ended, ["file"]))  # already ended
    store.sync_config_watches(["chat_a"], "latest", NOW + 5)
    row = store.get_watch("chat_a")
    assert row is not None
    assert (row.state, row.reason) == ("ended", "not_found")
    assert [d.event_id for d in store.due_deliveries("file", NOW + 5)] == [ended.id]
    row = store.add_runtime_watch("chat_a", "none", NOW + 6)
    assert row.active
    assert row.source == "config+runtime"


def test_delivery_retry_and_dead_letter(store: SqliteStore) -> None:
    """1. a delivery fails and is retried later 2. not due before its time 3. delivered or dead
    deliveries are never due again."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    store.save_poll(poll(), [(event(1), ["s"]), (event(2), ["s"])])
    first, second = store.due_deliveries("s", NOW)
    store.mark_retry(first.seq, "s", NOW + 30, "boom", NOW)
    assert [d.event_id for d in store.due_deliveries("s", NOW + 29)] == [second.event_id]
    assert store.next_delivery_at("s") == NOW
    store.mark_delivered(second.seq, "s", NOW)
    assert store.next_delivery_at("s") == NOW + 30
    (again,) = store.due_deliveries("s", NOW + 30)
    assert again.attempts == 1
    store.mark_dead(again.seq, "s", "gone", NOW + 30)
    assert store.due_deliveries("s", NOW + 1000) == []
    assert store.next_delivery_at("s") is None
    assert store.delivery_counts() == {("s", "dead"): 1, ("s", "delivered"): 1}


def test_committed_state_survives_a_connection_that_never_closed(tmp_path: Path) -> None:
    """1. an event is saved and the process 'dies' without closing the connection 2. another
    connection sees it (the WAL holds committed transactions)."""
    path = tmp_path / "state.db"
    s = SqliteStore(path)
    s.open()
    s.sync_config_watches(["chat_a"], "latest", NOW)
    s.save_poll(poll(), [(event(1), ["file"])])
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    other.close()
    s.close()


def test_retry_delay_doubles_with_jitter_and_caps() -> None:
    """1. attempts 1..10 2. about 1, 2, 4, ... seconds ±10%, never above 66 s."""
    rng = random.Random(5)
    assert 0.9 <= backoff_delay(1, rng) <= 1.1
    assert 3.6 <= backoff_delay(3, rng) <= 4.4
    assert all(backoff_delay(n, rng) <= 66 for n in range(1, 40))


async def test_sink_worker_retries_in_order_and_stops(tmp_path: Path) -> None:
    """1. two events for a sink that fails twice 2. the worker retries, keeping order
    3. both arrive once 4. stop returns."""
    clock = [NOW]
    store = SqliteStore(tmp_path / "s.db")
    runner = StoreRunner(store)
    await runner.open()
    try:
        await runner.run(store.sync_config_watches, ["chat_a"], "latest", NOW)
        await runner.run(store.save_poll, poll(), [(event(1), ["mem"]), (event(2), ["mem"])])
        sink = MemorySink("mem")
        sink.fail_next = 2
        worker = SinkWorker(sink, runner, wall=lambda: clock[0])
        task = asyncio.create_task(worker.run())
        for _ in range(200):
            if len(sink.received) == 2:
                break
            clock[0] += 5.0  # time moves on; the worker's waits are computed from it
            worker.wake.set()
            await asyncio.sleep(0.01)
        assert [e["id"] for e in sink.received] == [event(1).id, event(2).id]
        assert not worker.failing
        worker.stop()
        await asyncio.wait_for(task, 2)
        counts = await runner.run(store.delivery_counts)
        assert counts == {("mem", "delivered"): 2}
    finally:
        await runner.close()


def test_prune_forgets_old_delivered_texts_but_keeps_ids(store: SqliteStore) -> None:
    """1. three old events: one delivered everywhere, one still pending, one dead 2. prune
    3. only the delivered one loses its text and delivery rows 4. its id still blocks a repeat."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    store.save_poll(poll(), [(event(1), ["s"]), (event(2), ["s"]), (event(3), ["s"])])
    one, _, three = store.due_deliveries("s", NOW)
    store.mark_delivered(one.seq, "s", NOW)
    store.mark_dead(three.seq, "s", "gone", NOW)
    assert store.prune(NOW - 1) == (0, 0)  # nothing is old enough yet
    assert store.prune(NOW + 1) == (1, 1)
    bodies = dict(store.db.execute("SELECT id, body FROM events").fetchall())
    assert bodies[event(1).id] == ""
    assert bodies[event(2).id] == event(2).to_json()
    assert bodies[event(3).id] == event(3).to_json()
    assert [d.event_id for d in store.due_deliveries("s", NOW + 5)] == [event(2).id]
    assert [d.event_id for d in store.dead_letters()] == [event(3).id]
    assert store.save_poll(poll(), [(event(1), ["s"])]) == []  # never reported again


def test_active_watches_come_in_pages_each_once(store: SqliteStore) -> None:
    """1. 2,500 configured watches, 3 of them ended 2. read 1,000 at a time from position 0
    3. every active watch comes exactly once, no ended one, and the last page is short
    4. a page after the end is empty and keeps the position."""
    ids = [f"chat_{i:05d}" for i in range(2_500)]
    store.sync_config_watches(ids, "latest", NOW)
    for short_id in ids[10:13]:
        assert store.end_watch(short_id, "not_found", NOW + 1, None)
    seen: list[str] = []
    sizes: list[int] = []
    after = 0
    while True:
        rows, after = store.active_watches_page(after, 1_000)
        if not rows:
            break
        sizes.append(len(rows))
        seen += [row.short_id for row in rows]
        assert all(row.active for row in rows)
    assert sorted(seen) == sorted(set(ids) - set(ids[10:13]))
    assert len(seen) == len(set(seen))
    assert sizes == [1_000, 1_000, 497]
    assert store.active_watches_page(after, 1_000) == ([], after)


def test_sync_writes_only_the_rows_it_changes(store: SqliteStore) -> None:
    """1. 200 configured ids synced 2. triggers count every row written to `watches` 3. the
    same ids synced again write no row 4. one new id: one row written."""
    ids = [f"chat_{i}" for i in range(200)]
    store.sync_config_watches(ids, "latest", NOW)
    store.db.executescript(
        """
        CREATE TEMP TABLE written (short_id TEXT);
        CREATE TEMP TRIGGER count_updates AFTER UPDATE ON main.watches
            BEGIN INSERT INTO written VALUES (new.short_id); END;
        CREATE TEMP TRIGGER count_inserts AFTER INSERT ON main.watches
            BEGIN INSERT INTO written VALUES (new.short_id); END;
        """
    )
    assert store.sync_config_watches(ids, "latest", NOW + 1) == []
    assert store.db.execute("SELECT COUNT(*) FROM temp.written").fetchone()[0] == 0
    store.sync_config_watches([*ids, "chat_new"], "latest", NOW + 2)
    assert store.db.execute("SELECT short_id FROM temp.written").fetchall() == [("chat_new",)]
