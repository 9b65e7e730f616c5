"""The detector as table tests: plain data in, events out, no clock and no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon.detect import WatchState, detect, expired, is_pending
from daemon.events import reply_event_id
from daemon.qatech import Conversation

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


def msg(mid: str, role: str, minute: int, status: str | None = "COMPLETED", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": mid,
        "role": role,
        "createdAt": (T0 + timedelta(minutes=minute)).isoformat(),
        "text": f"text of {mid}",
        **extra,
    }
    if status is not None:
        body["status"] = status
    return body


def conv(*messages: dict[str, Any], updated: int = 0) -> Conversation:
    """Messages are given newest first, as the API sends them."""
    return Conversation.model_validate(
        {
            "shortId": "chat_abc",
            "url": "https://app.qa.tech/chat/chat_abc",
            "title": "t",
            "createdAt": T0.isoformat(),
            "updatedAt": (T0 + timedelta(minutes=updated)).isoformat(),
            "messages": list(messages),
        }
    )


def ids(detection: Any) -> list[str]:
    return [e.data["message"]["id"] for e in detection.events]


def test_user_message_newest_is_pending_and_reports_nothing() -> None:
    """1. only a user message (the reply is not there yet) 2. nothing reported, pending."""
    d = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    assert d.events == ()
    assert d.pending
    assert d.state.initialized


def test_empty_conversation_is_pending() -> None:
    """1. a chat just created has no messages 2. it is pending (polled fast)."""
    d = detect(WatchState(), conv(), now=NOW)
    assert d.pending
    assert d.events == ()


@pytest.mark.parametrize(
    ("backfill", "expected"),
    [("latest", ["a1"]), ("none", [])],
)
def test_watch_started_after_reply_finished(backfill: Any, expected: list[str]) -> None:
    """1. the reply finished before the watch began 2. latest reports it at once, none does not."""
    c = conv(msg("a1", "assistant", 2), msg("u1", "user", 1))
    d = detect(WatchState(), c, now=NOW, backfill=backfill)
    assert ids(d) == expected
    assert not d.pending
    again = detect(d.state, c, now=NOW, backfill=backfill)
    assert again.events == ()


def test_backfill_latest_reports_only_the_newest_reply() -> None:
    """1. three finished turns exist 2. only the newest reply is reported; older ones are history."""
    c = conv(
        msg("a3", "assistant", 6),
        msg("u3", "user", 5),
        msg("a2", "assistant", 4),
        msg("u2", "user", 3),
        msg("a1", "assistant", 2),
        msg("u1", "user", 1),
    )
    assert ids(detect(WatchState(), c, now=NOW)) == ["a3"]


def test_backfill_latest_skips_reply_older_than_a_user_message() -> None:
    """1. a follow-up is newest, the previous turn's reply is finished 2. nothing is reported."""
    c = conv(msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1))
    d = detect(WatchState(), c, now=NOW)
    assert d.events == ()
    assert d.pending


def test_follow_up_previous_turn_is_not_new_and_next_reply_is() -> None:
    """1. reply a1 reported 2. a follow-up arrives: a1 still newest assistant, not new
    3. a2 streams 4. a2 completes: reported once."""
    s1 = detect(WatchState(), conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    assert ids(s1) == ["a1"]
    s2 = detect(
        s1.state, conv(msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW
    )
    assert s2.events == ()
    assert s2.pending
    streaming = conv(
        msg("a2", "assistant", 4, status="PARTIAL", isStreaming=True),
        msg("u2", "user", 3),
        msg("a1", "assistant", 2),
        msg("u1", "user", 1),
    )
    s3 = detect(s2.state, streaming, now=NOW)
    assert s3.events == ()
    assert s3.pending
    done = conv(
        msg("a2", "assistant", 4), msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1)
    )
    s4 = detect(s3.state, done, now=NOW)
    assert ids(s4) == ["a2"]
    assert not s4.pending
    assert detect(s4.state, done, now=NOW).events == ()


@pytest.mark.parametrize(
    ("status", "streaming", "finished"),
    [
        ("INITIATED", False, False),
        ("PARTIAL", True, False),
        ("PARTIAL", False, False),
        ("COMPLETED", True, False),  # terminal status but still streaming: wait for the final text
        ("COMPLETED", False, True),
        ("FAILED", False, True),
        ("CANCELLED", False, True),
        ("THINKING", False, False),  # unknown status: not finished
        (None, False, False),
    ],
)
def test_which_statuses_are_finished(status: str | None, streaming: bool, finished: bool) -> None:
    """1. a reply in a given status after the watch began 2. reported only when finished."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    c = conv(msg("a1", "assistant", 2, status=status, isStreaming=streaming), msg("u1", "user", 1))
    d = detect(start.state, c, now=NOW)
    assert (ids(d) == ["a1"]) is finished
    assert d.pending is not finished


@pytest.mark.parametrize(
    ("status", "event_type"),
    [
        ("COMPLETED", "chat.reply.completed"),
        ("FAILED", "chat.reply.failed"),
        ("CANCELLED", "chat.reply.cancelled"),
    ],
)
def test_event_shape(status: str, event_type: str) -> None:
    """1. a reply finishes in each terminal status 2. the event follows the design's schema."""
    d = detect(WatchState(), conv(msg("a1", "assistant", 2, status=status), msg("u1", "user", 1)), now=NOW)
    (event,) = d.events
    assert event.type == event_type
    assert event.id == reply_event_id("chat_abc", "a1")
    assert event.id.startswith("evt_")
    assert "." not in event.id
    assert event.timestamp == "2026-11-27T11:00:00.000Z"
    assert event.data["conversation"] == {
        "shortId": "chat_abc",
        "url": "https://app.qa.tech/chat/chat_abc",
        "title": "t",
    }
    assert event.data["message"] == {
        "id": "a1",
        "role": "assistant",
        "status": status,
        "createdAt": "2026-11-27T10:02:00.000Z",
        "text": "text of a1",
    }


def test_event_ids_are_deterministic_and_distinct() -> None:
    """1. the same reply seen by two detectors 2. same id; another reply or chat differs."""
    assert reply_event_id("chat_a", "m1") == reply_event_id("chat_a", "m1")
    assert reply_event_id("chat_a", "m1") != reply_event_id("chat_a", "m2")
    assert reply_event_id("chat_a", "m1") != reply_event_id("chat_b", "m1")


def test_unknown_status_reported_once_per_conversation() -> None:
    """1. a reply in an unknown status 2. flagged as new once 3. not again on the next poll
    4. it then completes and is reported."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    odd = conv(msg("a1", "assistant", 2, status="THINKING"), msg("u1", "user", 1))
    d1 = detect(start.state, odd, now=NOW)
    assert d1.new_unknown_statuses == ("THINKING",)
    d2 = detect(d1.state, odd, now=NOW)
    assert d2.new_unknown_statuses == ()
    assert d2.pending
    d3 = detect(d2.state, conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    assert ids(d3) == ["a1"]


def test_several_replies_between_polls_come_oldest_first() -> None:
    """1. two turns finish between two polls 2. both reported, in the order written."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    c = conv(msg("a2", "assistant", 4), msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert ids(detect(start.state, c, now=NOW)) == ["a1", "a2"]


def test_window_floor_keeps_old_replies_old_when_limit_grows() -> None:
    """1. first poll with limit 2 sees the newest two messages 2. limit raised to 20 later
    3. the older finished reply that now shows up is history, not new."""
    full = [msg("a2", "assistant", 4), msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1)]
    d1 = detect(WatchState(), conv(*full[:2]), now=NOW, limit=2, backfill="none")
    assert d1.state.floor is not None
    d2 = detect(d1.state, conv(*full), now=NOW, limit=20)
    assert d2.events == ()


def test_known_set_stays_bounded_by_the_window() -> None:
    """1. many turns pass through a window of 4 2. the state never remembers more than 4 ids."""
    state = WatchState()
    messages: list[dict[str, Any]] = []
    for turn in range(30):
        messages = [msg(f"a{turn}", "assistant", 2 * turn + 1), msg(f"u{turn}", "user", 2 * turn), *messages]
        state = detect(state, conv(*messages[:4]), now=NOW, limit=4).state
    assert len(state.known) <= 4


def test_state_round_trips_through_json() -> None:
    """1. a state with every field set 2. serialised and read back 3. equal."""
    d = detect(
        WatchState(), conv(msg("a1", "assistant", 2, status="ODD"), msg("u1", "user", 1)), now=NOW, limit=2
    )
    restored = WatchState.from_json(d.state.to_json())
    assert restored == d.state
    assert WatchState.from_json(None) == WatchState()


def test_change_tracking_and_expiry() -> None:
    """1. first poll marks a change 2. the same body is not a change 3. expiry counts from the
    last change."""
    c = conv(msg("a1", "assistant", 2), msg("u1", "user", 1))
    d1 = detect(WatchState(), c, now=NOW)
    assert d1.changed
    later = NOW + timedelta(seconds=100)
    d2 = detect(d1.state, c, now=later)
    assert not d2.changed
    assert d2.state.last_change_at == NOW.timestamp()
    assert not expired(d2.state, NOW.timestamp() + 99, 100)
    assert expired(d2.state, NOW.timestamp() + 100, 100)
    assert not expired(d2.state, NOW.timestamp() + 10_000, None)
    d3 = detect(
        d2.state, conv(msg("u2", "user", 3), *c.model_dump(by_alias=True, mode="json")["messages"]), now=later
    )
    assert d3.changed
    assert d3.state.last_change_at == later.timestamp()


def test_order_is_taken_from_timestamps_not_position() -> None:
    """1. a server sends messages oldest first by mistake 2. the newest is still found."""
    c = conv(msg("u1", "user", 1), msg("a1", "assistant", 2))
    d = detect(WatchState(), c, now=NOW)
    assert ids(d) == ["a1"]
    assert is_pending([])


def test_limit_one_reports_the_reply_that_was_streaming_at_the_floor() -> None:
    """1. api.message_limit is 1: the window holds only the streaming reply (the floor)
    2. it completes 3. it is reported once."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW, limit=1)
    streaming = detect(
        start.state, conv(msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True)), now=NOW, limit=1
    )
    assert streaming.events == ()
    assert streaming.state.floor is not None
    done = detect(streaming.state, conv(msg("a1", "assistant", 2)), now=NOW, limit=1)
    assert ids(done) == ["a1"]
    assert detect(done.state, conv(msg("a1", "assistant", 2)), now=NOW, limit=1).events == ()
