"""Several `qawatch run` processes on one real PostgreSQL database (``state.url``): each reply
delivered once across the fleet, a replica killed with -9 taken over within the lease TTL,
the database unreachable for a while without losing anything.

Each replica has its own file sink (as each pod would); "once across the fleet" means each
event id is in exactly one of the files. Real processes, a real server (``pg_db``), the
simulator on its own thread; every wait is bounded.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import QAWATCH, subprocess_env

from daemon.simulator import SimConfig, SimulatorThread

TTL_S = 2.0
SIM_TOKEN = "sim-replicas-token"


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(token=SIM_TOKEN, reply_s=0.3, seed=11)) as thread:
        yield thread


class Replica:
    """One `qawatch run` with its own file sink, on the shared database."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        sim: SimulatorThread,
        db: str,
        ids: list[str],
        *,
        idle_s: float = 0.5,
        rate: float = 500,
    ) -> None:
        self.name = name
        self.out = tmp_path / f"{name}.ndjson"
        self.log = tmp_path / f"{name}.log"
        self.config = tmp_path / f"{name}.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "api": {"base_url": sim.base_url, "rate_limit_per_s": rate, "timeout_s": 2},
                    "poll": {
                        "active_interval_s": 0.1,
                        "idle_interval_s": idle_s,
                        "jitter": 0.1,
                        "error_backoff_max_s": 0.5,
                    },
                    "watch": {"ids": ids},
                    "state": {"url": db, "lease_ttl_s": TTL_S},
                    "sinks": [{"type": "file", "path": str(self.out)}],
                    "control": {"listen": None},
                    "log": {"format": "json"},
                    "shutdown": {"grace_s": 2},
                }
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {**subprocess_env(), "QAWATCH_API__TOKEN": SIM_TOKEN}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*QAWATCH, "run", "--config", str(self.config)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            return -9

    def events(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"event": line, "level": "raw"})
        return lines


@pytest.fixture
def fleet(tmp_path: Path, sim: SimulatorThread, pg_db: str) -> Iterator[Callable[..., Replica]]:
    replicas: list[Replica] = []

    def make(name: str, ids: list[str], idle_s: float = 0.5, rate: float = 500) -> Replica:
        replica = Replica(tmp_path, name, sim, pg_db, ids, idle_s=idle_s, rate=rate)
        replicas.append(replica)
        return replica

    try:
        yield make
    finally:
        for replica in replicas:
            replica.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def holders(db: str) -> Counter[str | None]:
    """Active watches by holder (empty before the first replica made the schema)."""
    with psycopg.connect(db) as conn:
        try:
            rows = conn.execute("SELECT holder, COUNT(*) FROM watches WHERE state = 'active' GROUP BY holder")
        except psycopg.errors.UndefinedTable:
            return Counter()
        return Counter({holder: int(n) for holder, n in rows.fetchall()})


def reply_ids(replicas: list[Replica]) -> Counter[str]:
    return Counter(e["id"] for r in replicas for e in r.events() if e["type"].startswith("chat.reply."))


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_share_the_watches_and_deliver_each_reply_once(
    fleet: Callable[..., Replica], sim: SimulatorThread, pg_db: str, count: int
) -> None:
    """1. 300 conversations, each with a reply finishing over the next ~3 s 2. `count`
    replicas with the same configuration on one database 3. each holds about its share
    4. every reply is in exactly one replica's file: none lost, none twice 5. all exit 0."""
    ids = [sim.sim.create_chat() for _ in range(300)]
    replicas = [fleet(f"r{i}", ids).start() for i in range(count)]
    wait_until(lambda: sum(holders(pg_db).values()) == 300 and None not in holders(pg_db), 30, "all held")
    wait_until(lambda: len(holders(pg_db)) == count and max(holders(pg_db).values()) <= 300 // count + 1,
               30, "even shares")  # fmt: skip
    for i, short_id in enumerate(ids):
        sim.sim.send_message(short_id, f"q{i}", reply=f"answer {i}", reply_s=0.5 + (i % 30) * 0.1)
    wait_until(lambda: len(reply_ids(replicas)) == 300, 60, "all 300 replies")
    time.sleep(1.0)  # more polls: a second delivery would show now
    seen = reply_ids(replicas)
    assert len(seen) == 300
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]
    assert all(r.events() for r in replicas)  # the work was spread: each delivered some
    assert [r.stop() for r in replicas] == [0] * count


def test_a_killed_replica_is_taken_over_within_the_ttl_losing_nothing(
    fleet: Callable[..., Replica], sim: SimulatorThread, pg_db: str
) -> None:
    """1. two replicas share 120 conversations 2. replies start finishing; one replica is
    killed with -9 3. within the TTL (plus one renewal) the other holds every watch 4. every
    reply is delivered; a reply in two files can only be one the killed replica had in
    flight, the same event id (at-least-once), and there are at most a handful."""
    ids = [sim.sim.create_chat() for _ in range(120)]
    a, b = fleet("a", ids).start(), fleet("b", ids).start()
    wait_until(lambda: len(holders(pg_db)) == 2 and None not in holders(pg_db), 30, "both holding")
    for i, short_id in enumerate(ids):
        sim.sim.send_message(short_id, f"q{i}", reply=f"answer {i}", reply_s=0.3 + (i % 40) * 0.1)
    wait_until(lambda: len(a.events()) >= 5, 30, "a to deliver a few")
    a.kill()
    killed_at = time.monotonic()
    wait_until(lambda: len(holders(pg_db)) == 1, TTL_S * 3 + 5, "b to hold everything")
    took_over_s = time.monotonic() - killed_at
    assert took_over_s <= TTL_S + TTL_S / 3 + 3.0, took_over_s
    wait_until(lambda: len(reply_ids([a, b])) == 120, 60, "all 120 replies")
    seen = reply_ids([a, b])
    twice = [k for k, n in seen.items() if n > 1]
    assert len(seen) == 120
    assert len(twice) <= 5, twice
    assert b.stop() == 0


def test_the_database_unreachable_for_a_while_loses_nothing(
    fleet: Callable[..., Replica], sim: SimulatorThread, pg_db: str, pg_url: str
) -> None:
    """1. two replicas share 60 conversations 2. the database refuses connections and drops
    the ones it has for 8 s (longer than a store call waits for a connection), while replies
    finish 3. each replica logs the outage once per kind of work, not once per poll 4. once
    it is back, every reply is delivered once."""
    ids = [sim.sim.create_chat() for _ in range(60)]
    replicas = [fleet("a", ids).start(), fleet("b", ids).start()]
    wait_until(lambda: len(holders(pg_db)) == 2 and None not in holders(pg_db), 30, "both holding")
    dbname = psycopg.conninfo.conninfo_to_dict(pg_db)["dbname"]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        for i, short_id in enumerate(ids):
            sim.sim.send_message(short_id, f"q{i}", reply=f"answer {i}", reply_s=0.2 + (i % 20) * 0.1)
        time.sleep(8.0)
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    wait_until(lambda: len(reply_ids(replicas)) == 60, 60, "all 60 replies after the outage")
    time.sleep(1.0)
    seen = reply_ids(replicas)
    assert max(seen.values()) == 1
    for replica in replicas:
        errors = [line for line in replica.log_lines() if line.get("level") == "error"]
        # a few kinds of work notice it (polls, leases, deliveries): each says so once
        assert 1 <= len(errors) <= 6, [e.get("event") for e in errors]
    assert [r.stop() for r in replicas] == [0, 0]


def test_sigterm_while_the_database_is_down_exits_within_the_grace_period(
    fleet: Callable[..., Replica], sim: SimulatorThread, pg_db: str, pg_url: str
) -> None:
    """Review: 1. one replica holds 40 conversations 2. the database refuses connections and
    replies finish meanwhile (so there is something to commit) 3. SIGTERM: the replica exits
    0 within its grace period (2 s) plus the last store call's wait for a connection, not
    after one such wait per unsaved poll."""
    ids = [sim.sim.create_chat() for _ in range(40)]
    replica = fleet("a", ids).start()
    wait_until(lambda: sum(holders(pg_db).values()) == 40 and None not in holders(pg_db), 30, "held")
    dbname = psycopg.conninfo.conninfo_to_dict(pg_db)["dbname"]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,)
            )
            for i, short_id in enumerate(ids):
                sim.sim.send_message(short_id, f"q{i}", reply=f"answer {i}", reply_s=0.1)
            time.sleep(3.0)
            began = time.monotonic()
            code = replica.stop()
            took = time.monotonic() - began
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    assert code == 0
    assert took <= 2.0 + 5.0 + 2.0, took  # grace, one wait for a connection, slack


@pytest.mark.timeout(240)  # 10,000 watches on a 2-core machine that also runs the server
def test_leases_hold_under_load_with_10000_watches_on_3_replicas(
    fleet: Callable[..., Replica], sim: SimulatorThread, pg_db: str
) -> None:
    """1. 10,000 idle conversations, 3 replicas, a 2 s lease (renewed every 0.67 s) 2. they
    settle at about a third each 3. over the next 4 TTLs, while every watch is being polled,
    no replica loses a lease it holds (no takeover churn: the split stays the same and no
    replica logs a lost lease) and all exit 0."""
    ids = [sim.sim.create_chat("q", reply="done", reply_s=0.0) for _ in range(10_000)]
    replicas = [fleet(f"r{i}", ids, idle_s=5.0, rate=100).start() for i in range(3)]

    def settled() -> bool:
        shares = holders(pg_db)
        return None not in shares and len(shares) == 3 and sum(shares.values()) == 10_000

    wait_until(settled, 150, "an even split")
    split = holders(pg_db)
    # shares are rounded up (3,334), so the last holds what the others leave (at least 3,332)
    assert max(split.values()) <= 3334, split
    assert min(split.values()) >= 10_000 - 2 * 3334, split
    time.sleep(4 * TTL_S)
    assert holders(pg_db) == split
    for replica in replicas:
        lost = [line for line in replica.log_lines() if line.get("event") == "leases lost to other replicas"]
        assert lost == [], (replica.name, lost)
    assert [r.stop() for r in replicas] == [0, 0, 0]
