"""One suite for both stores: SQLite (the embedded default) and PostgreSQL (``state.url``,
shared by replicas), on real databases; then what only the shared store does: leases on
watches and claims on deliveries, between two replicas on one real PostgreSQL server.

The PostgreSQL cases use ``pg_db`` (tests/pgserver.py): skipped, with the reason in pytest's
summary, where no server can be had.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import make_settings, running, until
from support import reply_event as event

from daemon.control import watch_json
from daemon.ctl import format_watches
from daemon.errors import ConfigError
from daemon.events import watch_ended_event
from daemon.settings import StateSettings, redacted
from daemon.simulator import Simulator
from daemon.store import STORE_ERRORS, PollRecord, SqliteStore, Store, StoreError
from daemon.store.postgres import PostgresStore

NOW = 1_800_000_000.0


def record(short_id: str, detector: str | None = '{"v":2}', at: float = NOW) -> PollRecord:
    return PollRecord(short_id, detector, 2.0, 0, at, "settled", at + 2.0)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "state.db")
    else:
        s = PostgresStore(request.getfixturevalue("pg_db"), "replica-a", lease_ttl_s=15.0)
    s.open()
    try:
        yield s
    finally:
        s.close()


def hold(store: Store) -> None:
    """A shared store writes a watch's polls only for the replica holding its lease."""
    if isinstance(store, PostgresStore):
        store.claim_watches(10_000)


# -- the shared suite ----------------------------------------------------------------------


def test_config_sync_adds_ends_and_starts_again(store: Store) -> None:
    """1. two configured ids become active watches 2. one leaves: returned as an orphan to
    end 3. ended as removed, it comes back with the configuration as a new watch."""
    assert store.sync_config_watches(["chat_a", "chat_b", "chat_a"], "latest", NOW) == []
    assert [r.short_id for r in store.watches(active_only=True)] == ["chat_a", "chat_b"]
    orphans = store.sync_config_watches(["chat_b"], "latest", NOW + 1)
    assert [r.short_id for r in orphans] == ["chat_a"]
    assert store.end_watch("chat_a", "removed", NOW + 1, None)
    assert not store.end_watch("chat_a", "removed", NOW + 1, None)  # once
    assert store.watch_counts() == {"active": 1, "ended": 1}
    store.sync_config_watches(["chat_a", "chat_b"], "none", NOW + 2)
    row = store.get_watch("chat_a")
    assert row is not None
    assert (row.state, row.started_at, row.backfill, row.detector) == ("active", NOW + 2, "none", None)


def test_runtime_watches_add_and_remove(store: Store) -> None:
    """1. a runtime add of a new id 2. its source is runtime 3. removing the runtime source of
    an id that is also configured keeps it configured 4. an unknown id is None."""
    row = store.add_runtime_watch("chat_r", "latest", NOW)
    assert (row.short_id, row.state, row.source) == ("chat_r", "active", "runtime")
    store.sync_config_watches(["chat_r"], "latest", NOW)
    removed = store.remove_runtime_watch("chat_r")
    assert removed is not None
    assert removed.source == "config"
    assert store.remove_runtime_watch("chat_unknown") is None


def test_an_event_is_stored_once_with_its_poll(store: Store) -> None:
    """1. a poll saves an event for two sinks with its state 2. the same event again (another
    poll, or another replica) is not new 3. each sink has one due delivery of it 4. the
    state and times are the poll's."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    hold(store)
    assert store.save_polls([(record("chat_a"), [(event(1), ["file", "hook"])])]) == [[event(1).id]]
    assert store.save_polls([(record("chat_a", at=NOW + 1), [(event(1), ["file", "hook"])])]) == [[]]
    for sink in ("file", "hook"):
        due = store.due_deliveries(sink, NOW + 5)
        assert [d.event_id for d in due] == [event(1).id]
    row = store.get_watch("chat_a")
    assert row is not None
    assert (row.detector, row.last_poll_at, row.last_status) == ('{"v":2}', NOW + 1, "settled")


def test_poll_times_touch_only_the_same_incarnation(store: Store) -> None:
    """1. poll times saved for the active watch are written 2. a poll of an earlier
    incarnation (the watch ended and started again meanwhile) writes nothing."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    hold(store)
    store.save_poll_times([record("chat_a", at=NOW + 3)])
    row = store.get_watch("chat_a")
    assert row is not None
    assert row.last_poll_at == NOW + 3
    stale = PollRecord("chat_a", None, 9.0, 0, NOW + 9, "settled", NOW + 10, started_at=NOW - 100)
    store.save_poll_times([stale])
    row = store.get_watch("chat_a")
    assert row is not None
    assert row.last_poll_at == NOW + 3


def test_deliveries_retry_die_and_are_replayed(store: Store) -> None:
    """1. two events for one sink 2. one delivered, one retried later, then dead 3. nothing
    due meanwhile; the dead letter lists it 4. replay puts it back, due at once 5. counts
    and prune (delivered rows go, ids stay)."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    hold(store)
    store.save_polls([(record("chat_a"), [(event(1), ["file"]), (event(2), ["file"])])])
    first, second = store.due_deliveries("file", NOW)
    store.mark_delivered_many([first.seq], "file", NOW + 1)
    store.mark_retry(second.seq, "file", NOW + 60, "HTTP 503", NOW + 1)
    assert store.due_deliveries("file", NOW + 30) == []
    assert store.next_delivery_at("file") == NOW + 60
    assert [d.seq for d in store.due_deliveries("file", NOW + 60)] == [second.seq]  # due (claimed) again
    store.mark_dead(second.seq, "file", "HTTP 503", NOW + 61)
    (dead,) = store.dead_letters()
    assert (dead.event_id, dead.attempts, dead.last_error) == (event(2).id, 2, "HTTP 503")
    assert store.replay_dead(NOW + 70, event_id=event(2).id) == 1
    assert [d.event_id for d in store.due_deliveries("file", NOW + 70)] == [event(2).id]
    assert store.delivery_counts() == {("file", "delivered"): 1, ("file", "pending"): 1}
    assert store.prune(NOW + 1000) == (1, 1)  # the delivered row, and its event's text
    assert store.save_polls([(record("chat_a"), [(event(1), ["file"])])]) == [[]]  # still known


def test_a_watch_ends_once_with_its_event(store: Store) -> None:
    """1. ending an active watch records its chat.watch.ended event for the sinks 2. a second
    end is refused and records nothing."""
    store.sync_config_watches(["chat_a"], "latest", NOW)
    ended = watch_ended_event("chat_a", "not_found", NOW, datetime.fromtimestamp(NOW, UTC))
    assert store.end_watch("chat_a", "not_found", NOW + 1, (ended, ["file"]))
    assert not store.end_watch("chat_a", "not_found", NOW + 2, (ended, ["file"]))
    assert [d.event_id for d in store.due_deliveries("file", NOW + 3)] == [ended.id]


def test_pages_of_active_watches(store: Store) -> None:
    """1. 25 watches, 2 ended 2. pages of 10 from position 0 3. every active one once."""
    ids = [f"chat_{i:02d}" for i in range(25)]
    store.sync_config_watches(ids, "latest", NOW)
    store.end_watch("chat_03", "expired", NOW, None)
    store.end_watch("chat_07", "expired", NOW, None)
    seen: list[str] = []
    after = 0
    while rows := store.active_watches_page(after, 10)[0]:
        seen += [r.short_id for r in rows]
        after = store.active_watches_page(after, 10)[1]
    assert sorted(seen) == sorted(set(ids) - {"chat_03", "chat_07"})


# -- PostgreSQL only: several replicas -------------------------------------------------------


@pytest.fixture
def pair(pg_db: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    """Two replicas on one database, with a 1 s lease (so a lapse takes a second of wall time)."""
    a = PostgresStore(pg_db, "replica-a", lease_ttl_s=1.0)
    b = PostgresStore(pg_db, "replica-b", lease_ttl_s=1.0)
    a.open()
    b.open()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_replicas_claim_disjoint_watches_at_the_same_time(pg_db: str) -> None:
    """1. 1,000 watches 2. two replicas claim 600 each at the same moment, from two threads
    3. no watch is held by both (FOR UPDATE SKIP LOCKED), every watch is held by one."""
    a = PostgresStore(pg_db, "replica-a", lease_ttl_s=30.0)
    b = PostgresStore(pg_db, "replica-b", lease_ttl_s=30.0)
    a.open()
    b.open()
    try:
        a.sync_config_watches([f"chat_{i:04d}" for i in range(1000)], "latest", NOW)
        got: dict[str, set[str]] = {}
        start = threading.Barrier(2)

        def claim(store: PostgresStore) -> None:
            start.wait()
            got[store.replica] = {row.short_id for row in store.claim_watches(600)}

        threads = [threading.Thread(target=claim, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not got["replica-a"] & got["replica-b"]
        assert len(got["replica-a"] | got["replica-b"]) == 1000
        assert a.holders() == {"replica-a": len(got["replica-a"]), "replica-b": len(got["replica-b"])}
    finally:
        a.close()
        b.close()


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_is_fenced(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """1. replica a holds a watch and renews it: b cannot claim it 2. a stops renewing; after
    the 1 s TTL b claims it 3. a's renewal no longer lists it 4. a's late poll does not
    overwrite b's cursor (fenced) 5. an event a still records is stored once all the same."""
    a, b = pair
    a.sync_config_watches(["chat_a"], "latest", NOW)
    assert [r.short_id for r in a.claim_watches(10)] == ["chat_a"]
    assert a.renew_leases() == {"chat_a"}
    assert b.claim_watches(10) == []
    time.sleep(1.2)
    assert [r.short_id for r in b.claim_watches(10)] == ["chat_a"]
    assert a.renew_leases() == set()
    b.save_polls([(record("chat_a", detector='{"v":"b"}'), [(event(1), ["file"])])])
    assert a.save_polls([(record("chat_a", detector='{"v":"a"}'), [(event(1), ["file"])])]) == [[]]
    row = b.get_watch("chat_a")
    assert row is not None
    assert (row.detector, row.holder) == ('{"v":"b"}', "replica-b")
    assert len(b.due_deliveries("file", NOW + 10)) == 1


def test_deliveries_are_claimed_by_one_replica_until_the_claim_lapses(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """1. three due deliveries 2. a claims them: b gets none 3. a delivers one and dies with
    two claimed 4. after the TTL b gets exactly those two (the in-flight ones, same ids)."""
    a, b = pair
    a.sync_config_watches(["chat_a"], "latest", NOW)
    a.claim_watches(10)
    a.save_polls([(record("chat_a"), [(event(n), ["hook"]) for n in (1, 2, 3)])])
    claimed = a.due_deliveries("hook", NOW + 1)
    assert len(claimed) == 3
    assert b.due_deliveries("hook", NOW + 1) == []
    a.mark_delivered(claimed[0].seq, "hook", NOW + 2)
    time.sleep(1.2)
    assert sorted(d.event_id for d in b.due_deliveries("hook", NOW + 3)) == sorted(
        d.event_id for d in claimed[1:]
    )


def test_release_hands_work_over_at_once_and_heartbeats_count_replicas(
    pair: tuple[PostgresStore, PostgresStore],
) -> None:
    """1. both replicas beat: two live 2. a holds 10 watches and a delivery claim 3. a
    releases all (shutdown) 4. b claims the 10 and the delivery at once, and sees one live."""
    a, b = pair
    a.sync_config_watches([f"chat_{i}" for i in range(10)], "latest", NOW)
    assert a.heartbeat() >= 1
    assert b.heartbeat() == 2
    assert len(a.claim_watches(100)) == 10
    a.save_polls([(record("chat_0"), [(event(9, "chat_0"), ["hook"])])])
    assert len(a.due_deliveries("hook", NOW + 1)) == 1
    a.release_all()
    assert len(b.claim_watches(100)) == 10
    assert len(b.due_deliveries("hook", NOW + 1)) == 1
    assert b.heartbeat() == 1


def test_an_unreachable_server_is_a_config_error_at_start_and_a_store_error_later(
    pg_db: str, tmp_path: Path
) -> None:
    """1. a URL with a wrong port: opening is one config error naming state.url, without the
    password 2. a store whose database goes away mid-run raises StoreError (one of
    STORE_ERRORS), not a driver's exception."""
    bad = PostgresStore("postgresql://qawatch:hunter2-secret@127.0.0.1:1/nowhere", "r", 15.0)
    with pytest.raises(ConfigError) as info:
        bad.open()
    assert "state.url" in str(info.value)
    assert "hunter2-secret" not in str(info.value)
    store = PostgresStore(pg_db, "replica-a", 15.0)
    store.open()
    try:
        store.sync_config_watches(["chat_a"], "latest", NOW)
        with store._conn() as conn:  # the database dropping every connection, as a restart does
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert store.get_watch("chat_a") is not None  # the pool checks and reconnects
        with pytest.raises(STORE_ERRORS) as failed:
            store._one("SELECT * FROM no_such_table")
        assert isinstance(failed.value, StoreError)
    finally:
        store.close()


async def test_a_replica_in_process_holds_lists_and_counts_its_leases(
    sim: Simulator, tmp_path: Path, pg_db: str
) -> None:
    """The daemon on a shared store: 1. it claims the 5 configured watches and reports each
    reply 2. /metrics says it holds 5 leases among 1 replica 3. the watch list names it as
    each watch's holder (the table gets a HOLDER column) 4. a watch added through its control
    API is leased to it at once 5. check-config's view of state.url hides the password."""
    ids = [sim.create_chat("q", reply=f"r{i}", reply_s=0.0) for i in range(5)]
    base = make_settings(sim, tmp_path, ids)
    url = pg_db.replace("postgresql://postgres@", "postgresql://postgres:not-the-password@", 1)
    settings = base.model_copy(update={"state": StateSettings(url=url, lease_ttl_s=3.0)})
    assert "not-the-password" not in json.dumps(redacted(settings))
    async with running(settings) as app:
        await until(
            lambda: app.metrics.events.labels("chat.reply.completed")._value.get() == 5,
            within=15.0,
            what="five replies",
        )
        assert app.metrics.leases_held._value.get() == 5
        assert app.metrics.replicas._value.get() == 1
        rows = [watch_json(row) for row in await app.watch_rows()]
        assert {row["holder"] for row in rows} == {app.replica}
        table = format_watches(rows, time.time())
        assert table.splitlines()[0].split()[-1] == "HOLDER"
        assert app.replica in table.splitlines()[1]
        extra = sim.create_chat("q", reply="late", reply_s=0.0)
        row, new = await app.add_watch(extra, "latest")
        assert new
        assert row.holder == app.replica
        await until(
            lambda: app.metrics.events.labels("chat.reply.completed")._value.get() == 6,
            within=15.0,
            what="the added watch's reply",
        )


def test_a_stale_claim_cannot_retry_or_kill_a_delivery_another_replica_holds(
    pg_db: str,
) -> None:
    """Review: 1. a claims a delivery; its claim lapses during a slow send; b claims it 2. a's
    late mark_retry does not clear b's claim: c gets nothing while b sends 3. b delivers it;
    a's late mark_dead does not turn it dead (nothing to replay)."""
    stores = [PostgresStore(pg_db, name, lease_ttl_s=1.0) for name in ("a", "b", "c")]
    for s in stores:
        s.open()
    a, b, c = stores
    try:
        a.sync_config_watches(["chat_a"], "latest", NOW)
        a.claim_watches(10)
        a.save_polls([(record("chat_a"), [(event(1), ["hook"])])])
        (mine,) = a.due_deliveries("hook", NOW + 1)
        time.sleep(1.2)
        (theirs,) = b.due_deliveries("hook", NOW + 2)
        a.mark_retry(mine.seq, "hook", NOW + 2, "timeout", NOW + 2)
        assert c.due_deliveries("hook", NOW + 3) == []
        b.mark_delivered_many([theirs.seq], "hook", NOW + 3)
        a.mark_dead(mine.seq, "hook", "gave up", NOW + 4)
        assert a.delivery_counts() == {("hook", "delivered"): 1}
        assert a.replay_dead(NOW + 5) == 0
    finally:
        for s in stores:
            s.close()


def test_a_wrong_database_name_is_said_at_start(pg_db: str) -> None:
    """Review: a URL naming a database that does not exist: exit-2 config error naming
    state.url and saying what is wrong, not only that the pool timed out."""
    missing = pg_db.rsplit("/", 1)[0] + "/no_such_database_here"
    store = PostgresStore(missing, "r", 15.0)
    with pytest.raises(ConfigError) as info:
        store.open()
    assert "state.url" in str(info.value)
    assert "no_such_database_here" in str(info.value)
