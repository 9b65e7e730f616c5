"""A sink's queue outlives a change of its name: the daemon says when events wait for a name
that no configured sink has (a real SQLite file, the daemon in-process)."""

from __future__ import annotations

from pathlib import Path

import structlog.testing
from support import logged, make_settings, running

from daemon.events import Event
from daemon.simulator import Simulator
from daemon.store import PollRecord, SqliteStore


async def test_pending_events_of_a_sink_no_longer_configured_are_named_at_start(
    sim: Simulator, tmp_path: Path
) -> None:
    """1. the state file holds an event pending for sink "old" 2. the daemon starts with one
    sink, "file" 3. one warning names "old" and its 1 pending event; nothing is lost or moved."""
    store = SqliteStore(tmp_path / "state.db")
    store.open()
    store.sync_config_watches(["chat_a"], "latest", 0.0)
    data = {"conversation": {"shortId": "chat_a"}, "message": {"id": "m1", "text": "t"}}
    event = Event(
        type="chat.reply.completed", id="evt_" + "0" * 32, timestamp="2026-12-01T00:00:00.000Z", data=data
    )
    record = PollRecord("chat_a", None, 2.0, 0, 0.0, "settled", 2.0)
    assert store.save_poll(record, [(event, ["old"])]) == [event.id]
    store.close()
    with structlog.testing.capture_logs() as entries:
        async with running(make_settings(sim, tmp_path, [])):
            pass
    (warning,) = logged(
        entries, "events wait for a sink that is not configured; name a sink so to deliver them"
    )
    assert (warning["sink"], warning["pending"], warning["configured"]) == ("old", 1, ["file"])
    store.open()
    assert store.delivery_counts()[("old", "pending")] == 1
    store.close()
