"""The detector as table tests: plain data in, events out, no clock and no I/O."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon.detect import (
    DIGEST_BYTES,
    MAX_UNKNOWN_STATUSES,
    SEEN_EXTRA,
    WINDOW_MAX,
    WatchState,
    detect,
    expired,
    follow_up_baseline,
    is_pending,
    is_waiting,
)
from daemon.events import reply_event_id
from daemon.models import Conversation

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
    d2 = detect(d1.state, conv(*full), now=NOW, limit=20)
    assert d2.events == ()


def test_seen_set_stays_bounded() -> None:
    """1. many turns pass through a window of 4 2. the state never remembers more than the
    window plus SEEN_EXTRA digests."""
    state = WatchState()
    messages: list[dict[str, Any]] = []
    for turn in range(100):
        messages = [msg(f"a{turn}", "assistant", 2 * turn + 1), msg(f"u{turn}", "user", 2 * turn), *messages]
        state = detect(state, conv(*messages[:4]), now=NOW, limit=4).state
    assert len(state.seen) <= (4 + SEEN_EXTRA) * DIGEST_BYTES
    assert len(state.to_json()) < 1000


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


def test_order_is_the_apis_not_the_timestamps() -> None:
    """Issue 7, case 4. 1. the API lists a reply above the user message although its
    createdAt is older 2. it is the newest reply: reported, and the turn is settled."""
    c = conv(msg("a1", "assistant", 1), msg("u1", "user", 2))
    d = detect(WatchState(), c, now=NOW)
    assert ids(d) == ["a1"]
    assert not d.pending
    start = detect(WatchState(), conv(msg("u1", "user", 2)), now=NOW)
    later = detect(start.state, c, now=NOW)
    assert ids(later) == ["a1"]
    assert not later.pending
    assert is_pending([])


def test_other_roles_are_ignored() -> None:
    """Issue 7, case 4. 1. the newest message has role "system" 2. the finished reply below it
    is still the newest reply: reported at once, not pending."""
    c = conv(msg("s1", "system", 3), msg("a1", "assistant", 2), msg("u1", "user", 1))
    d = detect(WatchState(), c, now=NOW)
    assert ids(d) == ["a1"]
    assert not d.pending
    tool_only = detect(WatchState(), conv(msg("t1", "tool", 1)), now=NOW)
    assert tool_only.pending  # no user or assistant message: nothing asked yet


def test_every_reply_of_the_turn_decides_pending() -> None:
    """Issue 7, case 5. 1. [a2 COMPLETED, a1 PARTIAL, u1] 2. pending while a1 streams
    3. a1 completes 4. reported, settled."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    streaming = conv(
        msg("a2", "assistant", 3),
        msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True),
        msg("u1", "user", 1),
    )
    d1 = detect(start.state, streaming, now=NOW)
    assert ids(d1) == ["a2"]
    assert d1.pending
    d2 = detect(
        d1.state, conv(msg("a2", "assistant", 3), msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW
    )
    assert ids(d2) == ["a1"]
    assert not d2.pending


def test_an_id_twice_in_one_answer_is_one_message() -> None:
    """Issue 7, case 6. 1. the answer lists a1 twice 2. one event."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    c = conv(msg("a1", "assistant", 2), msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert ids(detect(start.state, c, now=NOW)) == ["a1"]


@pytest.mark.parametrize("backfill", ["none", "latest"])
def test_history_that_vanishes_and_comes_back_stays_history(backfill: Any) -> None:
    """Issue 7, case 2. 1. a1 finished before the watch began (reported at once with latest)
    2. an answer hides it 3. it comes back 4. not reported (again)."""
    c = conv(msg("a1", "assistant", 2), msg("u1", "user", 1))
    d1 = detect(WatchState(), c, now=NOW, backfill=backfill)
    assert ids(d1) == (["a1"] if backfill == "latest" else [])
    d2 = detect(d1.state, conv(msg("u1", "user", 1)), now=NOW, backfill=backfill)
    d3 = detect(d2.state, c, now=NOW, backfill=backfill)
    assert d3.events == ()


def test_ties_in_another_order_are_not_new() -> None:
    """Issue 7, case 2. 1. two replies share a createdAt 2. the next answer orders them the
    other way and hides one 3. nothing is new."""
    c1 = conv(msg("a2", "assistant", 2), msg("a1", "assistant", 2), msg("u1", "user", 1))
    d1 = detect(WatchState(), c1, now=NOW, backfill="none")
    d2 = detect(d1.state, conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    d3 = detect(
        d2.state, conv(msg("a1", "assistant", 2), msg("a2", "assistant", 2), msg("u1", "user", 1)), now=NOW
    )
    assert d2.events == d3.events == ()


def test_old_reply_sliding_into_the_window_is_history() -> None:
    """1. a window of 2 sees [a2, u2] 2. an answer hides u2, so the older a1 slides in
    3. a1 is history: it is older than everything seen."""
    d1 = detect(WatchState(), conv(msg("a2", "assistant", 4), msg("u2", "user", 3)), now=NOW, limit=2)
    d2 = detect(d1.state, conv(msg("a2", "assistant", 4), msg("a1", "assistant", 2)), now=NOW, limit=2)
    assert d2.events == ()


def test_a_new_reply_hidden_at_first_is_reported_when_it_shows() -> None:
    """1. u2 and a2 arrive, but the answer hides a2 2. the next answer shows it 3. reported."""
    d1 = detect(WatchState(), conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW, backfill="none")
    d2 = detect(
        d1.state, conv(msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW
    )
    d3 = detect(
        d2.state,
        conv(
            msg("a3", "assistant", 6), msg("u3", "user", 5), msg("u2", "user", 3), msg("a1", "assistant", 2)
        ),
        now=NOW,
    )
    assert ids(d3) == ["a3"]
    d4 = detect(
        d3.state,
        conv(
            msg("a3", "assistant", 6), msg("u3", "user", 5), msg("a2", "assistant", 4), msg("u2", "user", 3)
        ),
        now=NOW,
    )
    assert ids(d4) == ["a2"]


def test_window_gap_is_flagged_and_the_full_read_reports_everything_new() -> None:
    """Issue 7, case 1. 1. limit 4 sees [a1, u1] 2. three turns arrive: the answer of 4 shares
    nothing with it: window_gap 3. the read with limit 100 reports all three replies."""
    d1 = detect(WatchState(), conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW, limit=4)
    full = [
        msg(f"{r}{t}", "assistant" if r == "a" else "user", 2 * t - (r == "u"))
        for t in (4, 3, 2)
        for r in "au"
    ]
    full += [msg("a1", "assistant", 2), msg("u1", "user", 1)]
    d2 = detect(d1.state, conv(*full[:4]), now=NOW, limit=4)
    assert d2.window_gap
    d3 = detect(d1.state, conv(*full), now=NOW, limit=WINDOW_MAX)
    assert not d3.window_gap
    assert ids(d3) == ["a2", "a3", "a4"]


def test_follow_up_never_answers_with_the_previous_turn() -> None:
    """Issue 7, case 3. 1. a1 still streams when the follow-up is sent 2. a1 completes before
    the follow-up is visible 3. nothing is the answer, pending 4. the follow-up and its answer
    a2 show 5. a2 is the answer."""
    before = conv(msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True), msg("u1", "user", 1))
    state = follow_up_baseline(before, "next?", now=NOW, limit=20)
    d1 = detect(state, conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    assert d1.events == ()
    assert d1.pending
    u2 = msg("u2", "user", 3, text="next?")
    d2 = detect(d1.state, conv(u2, msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    assert d2.events == ()
    assert d2.pending
    d3 = detect(
        d2.state,
        conv(msg("a2", "assistant", 4), u2, msg("a1", "assistant", 2), msg("u1", "user", 1)),
        now=NOW,
    )
    assert ids(d3) == ["a2"]
    assert not d3.pending


def test_limit_one_reports_the_reply_that_was_streaming() -> None:
    """1. api.message_limit is 1: the window holds only the streaming reply 2. it completes
    3. it is reported once."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW, limit=1)
    streaming = detect(
        start.state, conv(msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True)), now=NOW, limit=1
    )
    assert streaming.events == ()
    assert streaming.window_gap  # full and nothing in common: the caller reads again
    done = detect(streaming.state, conv(msg("a1", "assistant", 2)), now=NOW, limit=1)
    assert ids(done) == ["a1"]
    assert detect(done.state, conv(msg("a1", "assistant", 2)), now=NOW, limit=1).events == ()


def test_state_of_the_previous_version_keeps_its_replies_reported() -> None:
    """1. a state file written by the previous detector ({"known": [...], "floor": ...})
    2. read by this one 3. the replies it knew are not reported again; a new one is."""
    old = (
        '{"initialized":true,"known":["a1"],"floor":null,"unknown_statuses":[],'
        '"fingerprint":"x","pending":false}'
    )
    state = WatchState.from_json(old)
    c = conv(msg("a2", "assistant", 4), msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert ids(detect(state, c, now=NOW)) == ["a2"]


def test_messages_of_other_roles_are_landmarks() -> None:
    """Review: 1. a window of 20 "system" notes with backfill none 2. the same answer again is
    no window gap 3. with the history below them read at limit 100, the old reply is history."""
    notes = [msg(f"s{i}", "system", 10 + i) for i in range(20, 0, -1)]
    state = detect(WatchState(), conv(*notes), now=NOW, backfill="none").state
    assert not detect(state, conv(*notes), now=NOW).window_gap
    full = conv(*notes, msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert detect(state, full, now=NOW, limit=100, backfill="none").events == ()


def test_follow_up_with_a_note_newest_is_not_confused_with_an_old_question() -> None:
    """Review: 1. before the follow-up the window (limit 1) shows only a system note; an older
    question has the same text 2. the answer to the old question is never the answer."""
    state = follow_up_baseline(conv(msg("s1", "system", 5)), "again?", now=NOW, limit=1)
    u1 = msg("u1", "user", 1, text="again?")
    u2 = msg("u2", "user", 6, text="again?")
    d = detect(state, conv(u2, msg("s1", "system", 5), msg("a1", "assistant", 2), u1), now=NOW, limit=100)
    assert d.events == ()
    d2 = detect(d.state, conv(msg("a2", "assistant", 7), u2, msg("s1", "system", 5)), now=NOW, limit=100)
    assert ids(d2) == ["a2"]


def test_follow_up_listed_below_a_tied_older_reply_is_still_found() -> None:
    """Review: 1. the previous reply a1 ties with the follow-up and is listed above it
    2. the follow-up is found below it 3. a2, above both, is the answer."""
    before = conv(msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True), msg("u1", "user", 1))
    state = follow_up_baseline(before, "again?", now=NOW, limit=20)
    c = conv(
        msg("a2", "assistant", 3),
        msg("a1", "assistant", 2),
        msg("u2", "user", 2, text="again?"),
        msg("u1", "user", 1),
    )
    assert ids(detect(state, c, now=NOW)) == ["a2"]


def test_follow_up_answer_is_the_first_reply_after_it() -> None:
    """Review: 1. [a3 COMPLETED, a2 PARTIAL, follow-up] 2. nothing yet: a2 is the answer and
    still streams 3. a2 completes 4. a2 is the answer."""
    state = follow_up_baseline(
        conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), "again?", now=NOW, limit=20
    )
    u2 = msg("u2", "user", 3, text="again?")
    streaming = conv(
        msg("a3", "assistant", 5), msg("a2", "assistant", 4, status="PARTIAL", isStreaming=True), u2
    )
    d1 = detect(state, streaming, now=NOW)
    assert d1.events == ()
    assert d1.pending
    d2 = detect(d1.state, conv(msg("a3", "assistant", 5), msg("a2", "assistant", 4), u2), now=NOW)
    assert ids(d2) == ["a2"]


def test_every_unfinished_reply_of_a_full_window_is_remembered() -> None:
    """Review: 1. 70 replies stream at once (limit 100) 2. they all complete 3. all 70 are
    reported."""
    start = detect(WatchState(), conv(msg("u1", "user", 0)), now=NOW, limit=100)
    streaming = [msg(f"a{i}", "assistant", i, status="PARTIAL", isStreaming=True) for i in range(70, 0, -1)]
    d1 = detect(start.state, conv(*streaming, msg("u1", "user", 0)), now=NOW, limit=100)
    done = [msg(f"a{i}", "assistant", i) for i in range(70, 0, -1)]
    assert len(detect(d1.state, conv(*done, msg("u1", "user", 0)), now=NOW, limit=100).events) == 70


def test_unknown_statuses_are_reported_once_even_past_the_bound() -> None:
    """Review: 1. a conversation shows 20 different unknown statuses, poll after poll 2. each
    is reported at most once, and at most MAX_UNKNOWN_STATUSES are kept."""
    state = WatchState()
    reported: list[str] = []
    for _ in range(3):
        c = conv(
            *[msg(f"a{i}", "assistant", i, status=f"WEIRD_{i}") for i in range(20, 0, -1)],
            msg("u", "user", 0),
        )
        d = detect(state, c, now=NOW)
        reported += d.new_unknown_statuses
        state = d.state
    assert len(reported) == len(set(reported)) == MAX_UNKNOWN_STATUSES


def test_an_answer_longer_than_asked_is_cut_to_the_limit() -> None:
    """Review: 1. the API returns 5,000 messages for limit 20 2. the state stays small."""
    many = [msg(f"m{i}", "user", i) for i in range(5000, 0, -1)]
    state = detect(WatchState(), conv(*many), now=NOW, limit=20).state
    assert len(state.seen) <= (20 + SEEN_EXTRA) * DIGEST_BYTES


# -- the pace the poller keeps: waiting (no reply near its end) or streaming -------------


def phase(d: Any) -> str:
    assert not (d.waiting and not d.pending), "waiting is a kind of pending"
    return "settled" if not d.pending else "waiting" if d.waiting else "streaming"


def after_question(*replies: dict[str, Any]) -> Any:
    """The detection of replies to u1 (given newest first), after a poll that saw only u1."""
    start = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    return detect(start.state, conv(*replies, msg("u1", "user", 1)), now=NOW)


def test_user_message_newest_is_waiting() -> None:
    """1. only the question is listed (or nothing yet, or a finished earlier turn below it)
    2. waiting: the reply does not exist yet, it is not about to finish."""
    assert phase(detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)) == "waiting"
    assert phase(detect(WatchState(), conv(), now=NOW)) == "waiting"
    c = conv(msg("u2", "user", 3), msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert phase(detect(WatchState(), c, now=NOW)) == "waiting"


@pytest.mark.parametrize(
    ("status", "streaming", "expected"),
    [
        ("INITIATED", False, "waiting"),  # created, thinking: its end is not near
        ("PARTIAL", True, "streaming"),
        ("PARTIAL", False, "streaming"),  # PARTIAL alone says it streams
        ("INITIATED", True, "streaming"),  # isStreaming wins over the status
        ("COMPLETED", True, "streaming"),  # terminal but still streaming the final text
        ("THINKING", False, "streaming"),  # unknown status: polled at the active pace, to be safe
        (None, False, "streaming"),  # no status at all: unknown too
        ("COMPLETED", False, "settled"),
        ("FAILED", False, "settled"),
        ("CANCELLED", False, "settled"),
    ],
)
def test_phase_of_a_reply_by_its_status(status: str | None, streaming: bool, expected: str) -> None:
    """1. the reply to u1 in a given status 2. waiting, streaming or settled."""
    d = after_question(msg("a1", "assistant", 2, status=status, isStreaming=streaming))
    assert phase(d) == expected


@pytest.mark.parametrize(
    ("newer", "older", "expected"),
    [
        ("PARTIAL", "INITIATED", "streaming"),  # one of the turn streams: it is about to finish
        ("INITIATED", "PARTIAL", "streaming"),
        ("INITIATED", "INITIATED", "waiting"),
        ("INITIATED", "COMPLETED", "waiting"),  # the finished one was reported; the other thinks
        ("COMPLETED", "PARTIAL", "streaming"),
        ("COMPLETED", "COMPLETED", "settled"),
    ],
)
def test_phase_with_several_replies_in_the_turn(newer: str, older: str, expected: str) -> None:
    """1. two replies to the same question 2. streaming if any unfinished one streams, waiting
    if every unfinished one is INITIATED."""
    d = after_question(
        msg("a2", "assistant", 3, status=newer, isStreaming=newer == "PARTIAL"),
        msg("a1", "assistant", 2, status=older, isStreaming=older == "PARTIAL"),
    )
    assert phase(d) == expected


def test_previous_turn_streaming_does_not_count() -> None:
    """1. an old reply below the newest question is still PARTIAL (the API left it so)
    2. only the current turn decides: waiting."""
    c = conv(
        msg("u2", "user", 3),
        msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True),
        msg("u1", "user", 1),
    )
    assert phase(detect(WatchState(), c, now=NOW)) == "waiting"


def test_other_roles_do_not_change_the_phase() -> None:
    """1. a system note above an INITIATED reply 2. still waiting; the note above a PARTIAL
    one: still streaming."""
    note = msg("s1", "system", 4, status="PARTIAL", isStreaming=True)
    assert phase(after_question(note, msg("a1", "assistant", 2, status="INITIATED"))) == "waiting"
    partial = msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True)
    assert phase(after_question(msg("s2", "system", 4), partial)) == "streaming"


def test_a_reply_that_goes_from_initiated_to_streaming_to_done() -> None:
    """1. waiting for the reply 2. INITIATED: waiting 3. PARTIAL: streaming 4. COMPLETED:
    reported, settled."""
    d0 = detect(WatchState(), conv(msg("u1", "user", 1)), now=NOW)
    d1 = detect(d0.state, conv(msg("a1", "assistant", 2, status="INITIATED"), msg("u1", "user", 1)), now=NOW)
    partial = msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True)
    d2 = detect(d1.state, conv(partial, msg("u1", "user", 1)), now=NOW)
    d3 = detect(d2.state, conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW)
    assert [phase(d) for d in (d0, d1, d2, d3)] == ["waiting", "waiting", "streaming", "settled"]
    assert ids(d3) == ["a1"]


def test_follow_up_not_visible_yet_is_waiting() -> None:
    """ask --chat: 1. the previous reply still streams when the follow-up is sent 2. the
    follow-up is not listed yet: waiting, whatever the old reply does 3. it shows with an
    INITIATED answer: waiting 4. the answer streams: streaming 5. done: settled."""
    before = conv(msg("a1", "assistant", 2, status="PARTIAL", isStreaming=True), msg("u1", "user", 1))
    state = follow_up_baseline(before, "next?", now=NOW, limit=20)
    d1 = detect(state, before, now=NOW)
    assert phase(d1) == "waiting"
    u2 = msg("u2", "user", 3, text="next?")
    d2 = detect(
        d1.state,
        conv(
            msg("a2", "assistant", 4, status="INITIATED"), u2, msg("a1", "assistant", 2), msg("u1", "user", 1)
        ),
        now=NOW,
    )
    assert phase(d2) == "waiting"
    d3 = detect(
        d2.state,
        conv(msg("a2", "assistant", 4, status="PARTIAL", isStreaming=True), u2, msg("a1", "assistant", 2)),
        now=NOW,
    )
    assert phase(d3) == "streaming"
    d4 = detect(d3.state, conv(msg("a2", "assistant", 4), u2, msg("a1", "assistant", 2)), now=NOW)
    assert phase(d4) == "settled"
    assert ids(d4) == ["a2"]


def test_is_waiting_on_its_own() -> None:
    """1. lists of messages, newest first 2. waiting only while pending with nothing streaming."""
    assert is_waiting([])
    c = conv(msg("a1", "assistant", 2, status="INITIATED"), msg("u1", "user", 1))
    assert is_waiting(list(c.messages))
    c = conv(msg("a1", "assistant", 2), msg("u1", "user", 1))
    assert not is_waiting(list(c.messages))  # settled is not waiting
    assert not is_pending(list(c.messages))


def test_fingerprint_is_kept_as_a_number_and_stored_as_hex() -> None:
    """1. a detected state's fingerprint survives to_json/from_json 2. it is stored as 16 hex
    digits (what earlier versions wrote, so an upgrade sees no change) 3. a damaged or
    missing one reads as 0: the next answer merely counts as a change."""
    state = detect(WatchState(), conv(msg("a1", "assistant", 2), msg("u1", "user", 1)), now=NOW).state
    assert isinstance(state.fingerprint, int)
    assert state.fingerprint != 0
    stored = json.loads(state.to_json())["fingerprint"]
    assert len(stored) == 16
    assert int(stored, 16) == state.fingerprint
    assert WatchState.from_json(state.to_json()).fingerprint == state.fingerprint
    for bad in ('"x"', '"zzzzzzzzzzzzzzzz"', "12", "null"):
        damaged = state.to_json().replace(f'"fingerprint":"{stored}"', f'"fingerprint":{bad}')
        assert WatchState.from_json(damaged).fingerprint == 0


def test_base_equal_to_seen_is_one_object() -> None:
    """100,000 settled watches hold one digest string for both fields, not two equal ones:
    1. as detect leaves it 2. as read back from the store."""
    state = detect(WatchState(), conv(msg("u1", "user", 0), msg("a1", "assistant", 1)), now=NOW).state
    assert state.base == state.seen
    assert state.base is state.seen
    again = WatchState.from_json(state.to_json())
    assert again == state
    assert again.base is again.seen
