"""Property tests of the detector against a small reference model of the contract.

The model below is written from design.md ("Which messages become events") and does not call
any helper of :mod:`daemon.detect`: it keeps the whole world (every message ever written, in
the order the API lists them) and what each answer showed, and states what must hold.

A history is a list of operations: write a user, assistant or other-role message, change a
reply's status (including back from terminal), poll (hiding some messages from that answer,
swapping messages that share a createdAt, listing an id twice, with a small limit), and
restart (the state goes through JSON). The harness applies the window rule as the poller
does: a ``window_gap`` answer is read again with limit 100.

``make test`` runs a bounded number of examples; ``make proptest`` runs thousands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, note
from hypothesis import strategies as st

from daemon.detect import WINDOW_MAX, Detection, WatchState, detect, follow_up_baseline
from daemon.models import Conversation

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
STATUSES = ("INITIATED", "PARTIAL", "COMPLETED", "FAILED", "CANCELLED", "WEIRD")
MAX_STATE_JSON = 2_000  # bytes: small and bounded whatever the history


# -- the world -------------------------------------------------------------------------


@dataclass
class Msg:
    id: str
    role: str
    tick: int  # messages written in the same tick share a createdAt (a tie)
    born: int  # how many polls had happened when it was written
    status: str = "COMPLETED"
    streaming: bool = False
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL and not self.streaming

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "createdAt": (T0 + timedelta(seconds=self.tick)).isoformat(),
            "text": self.text or f"text of {self.id}",
            "status": self.status,
            "isStreaming": self.streaming,
        }


@dataclass
class World:
    messages: list[Msg] = field(default_factory=list)  # oldest first
    tick: int = 0
    counter: int = 0
    polls: int = 0

    def write(self, role: str, status: str = "COMPLETED", text: str = "") -> Msg:
        self.counter += 1
        streaming = status == "PARTIAL"
        message = Msg(f"m{self.counter}", role, self.tick, self.polls, status, streaming, text)
        self.messages.append(message)
        return message

    def replies(self) -> list[Msg]:
        return [m for m in self.messages if m.role == "assistant"]

    def answer(self, limit: int, hidden: set[str], swap_ties: bool, twice: int | None) -> list[Msg]:
        """What the API lists: newest first, less the hidden, ties maybe swapped, one id maybe
        twice, at most ``limit``."""
        listed = [m for m in reversed(self.messages) if m.id not in hidden]
        if swap_ties:
            i = 0
            while i + 1 < len(listed):
                if listed[i].tick == listed[i + 1].tick:
                    listed[i], listed[i + 1] = listed[i + 1], listed[i]
                    i += 2
                else:
                    i += 1
        if twice is not None and listed:
            k = twice % len(listed)
            listed.insert(k + 1, listed[k])
        return listed[:limit]


def conversation(listed: list[Msg]) -> Conversation:
    return Conversation.model_validate(
        {
            "shortId": "chat_prop",
            "url": "https://app.qa.tech/chat/chat_prop",
            "createdAt": T0.isoformat(),
            "updatedAt": T0.isoformat(),
            "messages": [m.body() for m in listed],
        }
    )


def processed(listed: list[Msg]) -> list[Msg]:
    """The contract's view of an answer: user and assistant messages, each id once (first),
    as copies (the world changes later)."""
    out: list[Msg] = []
    ids: set[str] = set()
    for m in listed:
        if m.role in ("user", "assistant") and m.id not in ids:
            ids.add(m.id)
            out.append(replace(m))
    return out


def model_pending(view: list[Msg]) -> bool:
    """Pending: nothing yet, a user message newest, or an unfinished reply in the current turn."""
    turn = []
    for m in view:
        if m.role == "user":
            break
        turn.append(m)
    return not turn or not all(m.status in TERMINAL and not m.streaming for m in turn)


def model_waiting(view: list[Msg]) -> bool:
    """Waiting (the slower pending pace): pending, and no reply of the current turn is near its
    end: each unfinished one is INITIATED and not streaming (PARTIAL, streaming or an unknown
    status is streaming). No reply of the turn at all is waiting too."""
    if not model_pending(view):
        return False
    current: list[Msg] = []
    for m in view:
        if m.role == "user":
            break
        current.append(m)
    near_end = [m for m in current if not m.finished and (m.status != "INITIATED" or m.streaming)]
    return not near_end


# -- operations --------------------------------------------------------------------------

write_op = st.tuples(
    st.just("write"), st.sampled_from(["user", "assistant", "assistant", "system"]), st.sampled_from(STATUSES)
)
status_op = st.tuples(st.just("status"), st.integers(0, 50), st.sampled_from(STATUSES), st.booleans())
poll_op = st.tuples(
    st.just("poll"),
    st.sets(st.integers(0, 10), max_size=3),  # positions (newest first) of messages to hide
    st.booleans(),  # swap ties
    st.one_of(st.none(), st.integers(0, 40)),  # an id listed twice
    st.sampled_from([1, 2, 3, 4, 6, 20]),  # limit
)
restart_op = st.just(("restart",))
ops = st.lists(st.one_of(write_op, write_op, status_op, poll_op, poll_op, restart_op), max_size=40)


@dataclass
class Run:
    """The harness: a detector driven like the poller drives it, and what each poll showed."""

    backfill: str
    state: WatchState = field(default_factory=WatchState)
    events: list[tuple[int, str, str]] = field(default_factory=list)  # (poll, message id, status)
    polls: int = 0
    #: the ids each answer listed, every role (messages of other roles are landmarks too)
    answers: list[list[str]] = field(default_factory=list)

    def poll(self, world: World, hidden: set[str], swap: bool, twice: int | None, limit: int) -> list[Msg]:
        listed = world.answer(limit, hidden, swap, twice)
        d = detect(self.state, conversation(listed), now=T0, backfill=self.backfill, limit=limit)  # type: ignore[arg-type]
        if d.window_gap and limit < WINDOW_MAX:
            listed = world.answer(WINDOW_MAX, hidden, swap, twice)
            d = detect(self.state, conversation(listed), now=T0, backfill=self.backfill, limit=WINDOW_MAX)  # type: ignore[arg-type]
        view = processed(listed)
        self.answers.append([m.id for m in listed])
        assert d.pending == model_pending(view), f"pending at poll {self.polls}"
        assert d.waiting == model_waiting(view), f"waiting at poll {self.polls}"
        for e in d.events:
            self.events.append((self.polls, e.data["message"]["id"], e.data["message"]["status"]))
        self.state = d.state
        assert WatchState.from_json(self.state.to_json()) == self.state
        assert len(self.state.to_json()) <= MAX_STATE_JSON
        self.polls += 1
        return view


def change(world: World, op: tuple[Any, ...]) -> None:
    """A write or status operation on the world."""
    if op[0] == "write":
        world.write(op[1], op[2] if op[1] == "assistant" else "COMPLETED")
    elif op[0] == "status" and world.replies():
        reply = world.replies()[op[1] % len(world.replies())]
        reply.status, reply.streaming = op[2], op[3] and op[2] != "INITIATED"


@dataclass
class Facts:
    """What the model knows after a run: every answer as the contract sees it, and the world
    as it was at the first poll."""

    views: list[list[Msg]] = field(default_factory=list)
    existed_at_first: set[str] = field(default_factory=set)
    finished_in_first: set[str] = field(default_factory=set)
    beyond: set[str] = field(default_factory=set)  # replies older than the whole first (full) answer
    backfilled: str | None = None
    hidden_since_written: set[str] = field(default_factory=set)  # replies some answer hid

    def first_poll(self, world: World, view: list[Msg], raw: list[Msg], limit: int) -> None:
        self.existed_at_first = {m.id for m in world.messages}
        self.finished_in_first = {m.id for m in view if m.role == "assistant" and m.finished}
        if view and view[0].role == "assistant" and view[0].finished:
            self.backfilled = view[0].id
        if len(raw) >= limit:  # a full window: replies older than all of it are history
            oldest = min(m.tick for m in raw)
            self.beyond = {r.id for r in world.replies() if r.tick < oldest}


def play(world: World, run: Run, ops: list[tuple[Any, ...]]) -> Facts:
    facts = Facts()
    for op in ops:
        if op[0] != "poll":
            if op[0] == "restart":
                run.state = WatchState.from_json(run.state.to_json())
            change(world, op)
            continue
        hidden = {world.messages[-1 - i].id for i in op[1] if i < len(world.messages)}
        view = run.poll(world, hidden, op[2], op[3], op[4])
        if not facts.views:
            facts.first_poll(world, view, world.answer(op[4], hidden, op[2], op[3]), op[4])
        # 5. the window: a reply written and finished since the last poll is reported now,
        # however many messages came after it (the harness reads again with limit 100)
        reported = {mid for _, mid, _ in run.events}
        for r in world.replies():
            if facts.views and r.born == len(facts.views) and r.finished and r.id not in hidden:
                assert r.id in reported, f"{r.id} lost from the window"
        facts.hidden_since_written |= hidden
        facts.views.append(view)
        world.polls += 1
        world.tick += 1  # nothing written after a poll ties with what it saw
    return facts


def check_events_are_finished_replies_once(run: Run, facts: Facts) -> None:
    reported = [mid for _, mid, _ in run.events]
    # 1. a reply is reported at most once, ever
    assert len(reported) == len(set(reported))
    # 2. each event is a reply the answer of that poll showed finished, with that status
    for poll, mid, status in run.events:
        shown = next(m for m in facts.views[poll] if m.id == mid)
        assert shown.role == "assistant"
        assert shown.status == status
        assert status in TERMINAL
        assert not shown.streaming


def check_history_stays_history(run: Run, facts: Facts, backfill: str) -> None:
    """3. History stays history, including replies older than the first window that slide into
    a later one; backfill latest reports the newest finished reply at once."""
    backfilled = {facts.backfilled} if backfill == "latest" and facts.backfilled else set()
    history = (facts.finished_in_first | facts.beyond) - backfilled
    first_ids = {m.id for m in facts.views[0]} if facts.views else set()
    for poll, mid, _ in run.events:
        # a reply from before the watch is recognised by a message of the first answer listed
        # above it when it first shows; an answer that hides all of those leaves nothing to
        # tell old from new
        ids = next(ids for v in facts.views if mid in (ids := [m.id for m in v]))
        anchored = any(i in first_ids for i in ids[: ids.index(mid)])
        assert mid not in history or not anchored, f"history {mid} reported at poll {poll}"
    for mid in backfilled:
        assert (0, mid) in {(p, m) for p, m, _ in run.events}


def check_every_new_reply_is_reported(run: Run, facts: Facts) -> None:
    """4. Every other reply seen finished is reported by the end of that poll. A reply hidden
    from some answers may be taken for history when it shows below everything seen, or after
    an answer that listed nothing seen before (every landmark hidden)."""
    views = facts.views
    answers = run.answers  # every role: an answer of only a system note is blind too
    blind = any(
        answers[p] and not set(answers[p]) & {i for a in answers[:p] for i in a}
        for p in range(1, len(answers))
    )
    unknowable = facts.existed_at_first - {m.id for m in views[0]} if views else set()
    for poll, view in enumerate(views):
        earlier = {m.id for v in views[:poll] for m in v}
        for i, m in enumerate(view):
            if m.role != "assistant" or not m.finished or m.id in facts.finished_in_first | unknowable:
                continue
            hidden = m.id in facts.hidden_since_written
            if hidden and (blind or not any(o.id in earlier for o in view[i + 1 :])):
                continue
            assert any(p <= poll and mid == m.id for p, mid, _ in run.events), f"{m.id} missed at poll {poll}"


@given(before=st.lists(write_op, max_size=12), ops=ops, backfill=st.sampled_from(["latest", "none"]))
def test_detector_follows_the_contract(
    before: list[tuple[Any, ...]], ops: list[tuple[Any, ...]], backfill: str
) -> None:
    world = World()
    for op in before:
        change(world, op)
        world.tick += 1
    run = Run(backfill)
    facts = play(world, run, ops)
    note(f"events: {run.events}")
    check_events_are_finished_replies_once(run, facts)
    check_history_stays_history(run, facts, backfill)
    check_every_new_reply_is_reported(run, facts)


def check_follow_up_pace(d: Detection, view: list[Msg], follow: str, *, seen_before: bool) -> None:
    """ask --chat: pending and waiting as the model says for the replies newer than the
    follow-up. Before the follow-up is visible it is pending; waiting until it was ever seen
    (it was just sent), else (hidden again) not, so polled at the active pace, to be safe."""
    ids = [m.id for m in view]
    if follow not in ids:
        assert d.pending
        assert d.waiting == (not seen_before)
    else:
        current = view[: ids.index(follow)]
        assert d.pending == model_pending(current)
        assert d.waiting == model_waiting(current)


follow_ops = st.lists(st.one_of(write_op, status_op, poll_op, poll_op, restart_op), max_size=30)


@given(
    before=st.lists(write_op, max_size=8),
    base_hidden=st.sets(st.integers(0, 8), max_size=2),
    lag=st.integers(0, 3),
    ops=follow_ops,
)
def test_follow_up_answer_is_newer_than_the_follow_up(
    before: list[tuple[Any, ...]], base_hidden: set[int], lag: int, ops: list[tuple[Any, ...]]
) -> None:
    """ask --chat: 1. the conversation has any history, replies maybe still streaming 2. the
    follow-up is sent (the read before it may miss some messages) and hidden from the first
    ``lag`` answers 3. the answer reported is
    always newer than the follow-up, and is found once it shows finished beside it."""
    world = World()
    for op in before:
        world.write(op[1], op[2] if op[1] == "assistant" else "COMPLETED")
    world.tick += 1
    hidden = {world.messages[-1 - i].id for i in base_hidden if i < len(world.messages)}
    baseline = follow_up_baseline(
        conversation(world.answer(20, hidden, False, None)), "again?", now=T0, limit=20
    )
    world.tick += 1
    follow = world.write("user", text="again?")
    after_follow = len(world.messages)
    world.tick += 1  # a reply that ties with the follow-up may be listed below it: not the answer
    state = baseline
    answer: str | None = None
    for op in ops:
        if op[0] == "write":
            world.write(op[1], op[2] if op[1] == "assistant" else "COMPLETED")
        elif op[0] == "status" and world.replies():
            reply = world.replies()[op[1] % len(world.replies())]
            reply.status, reply.streaming = op[2], op[3] and op[2] != "INITIATED"
        elif op[0] == "restart":
            state = WatchState.from_json(state.to_json())
        elif op[0] == "poll" and answer is None:
            hidden = {world.messages[-1 - i].id for i in op[1] if i < len(world.messages)}
            if lag > 0:
                hidden.add(follow.id)
                lag -= 1
            limit = op[4]
            listed = world.answer(limit, hidden, op[2], op[3])
            d = detect(state, conversation(listed), now=T0, backfill="latest", limit=limit)
            if d.window_gap and limit < WINDOW_MAX:
                listed = world.answer(WINDOW_MAX, hidden, op[2], op[3])
                d = detect(state, conversation(listed), now=T0, backfill="latest", limit=WINDOW_MAX)
            view = processed(listed)
            ids = [m.id for m in view]
            check_follow_up_pace(d, view, follow.id, seen_before=state.follow_up != b"")
            state = d.state
            newer = {m.id for m in world.messages[after_follow:]}
            # the answer is the first reply listed above the follow-up
            first = None
            if follow.id in ids:
                first = next(
                    (m for m in reversed(view[: ids.index(follow.id)]) if m.role == "assistant"), None
                )
            if d.events:
                answer = d.events[0].data["message"]["id"]
                assert answer in newer, "the answer is older than the follow-up"
                assert first is None or answer == first.id, "not the first reply after the follow-up"
            else:
                assert first is None or not first.finished, "answer missed"
            world.tick += 1
    note(json.dumps({"answer": answer}))
