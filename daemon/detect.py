"""Which messages become events: a pure function of (stored state, fresh answer, now).

No I/O and no clock reads here; see "Which messages become events" in the design. The rules:

* The API's order (newest first) is authoritative; ``createdAt`` is data. Only ``user`` and
  ``assistant`` messages count; a message id twice in one answer is its first occurrence.
* An assistant message is reported once, ever, the first time it is seen finished, unless it is
  *history*: finished when the watch began (the first answer), or an unknown message that the
  answer lists below a message of that first answer or below every message seen before (it
  slid into the window from beyond what qawatch ever covered).
* With ``backfill: latest`` the newest reply of the first answer is reported if it finished and
  no user message is newer.
* A follow-up (``ask --chat``): nothing that was in the conversation before it is the answer;
  only replies listed above the follow-up's own user message are, once it is visible.
* The window: a full answer that shares no message with what was seen before means messages
  were pushed out of it; :attr:`Detection.window_gap` tells the caller to read again with the
  largest limit (see :data:`WINDOW_MAX`).
* Pacing: a pending conversation is *waiting* (:attr:`Detection.waiting`) while no reply of the
  current turn exists or every unfinished one is ``INITIATED`` and not streaming (its end is not
  near), else *streaming* (``PARTIAL``, ``isStreaming`` or a status qawatch does not know).

The state is bounded: it keeps 8-byte digests of the messages of the last answer plus
:data:`SEEN_EXTRA` more (replies hidden from the last answer), never the full id set.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, TypeVar

from daemon.events import Event, reply_event
from daemon.models import KNOWN_STATUSES, Conversation, Message

Backfill = Literal["latest", "none"]
MISSING_STATUS = "<missing>"
DIGEST_BYTES = 8
WINDOW_MAX = 100  # the API's largest `limit`
SEEN_EXTRA = 32  # digests kept beyond the last answer: messages hidden from it, or just pushed out
MAX_UNKNOWN_STATUSES = 16
MAX_STATUS_CHARS = 40


def digest(text: str) -> bytes:
    """A short, fixed-size stand-in for a message id (or text) of any length."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


def _split(blob: bytes) -> list[bytes]:
    return [blob[i : i + DIGEST_BYTES] for i in range(0, len(blob) - DIGEST_BYTES + 1, DIGEST_BYTES)]


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text, validate=True) if isinstance(text, str) and text else b""


class DamagedState(ValueError):
    """A stored detector state that :meth:`WatchState.from_json` cannot read."""


T = TypeVar("T")

#: one empty set shared by every state that has none (100,000 watches: 100,000 sets fewer)
NONE: frozenset[Any] = frozenset()


def _shared(value: bytes, same_as: bytes) -> bytes:
    """``value``, or ``same_as`` when they are equal: one bytes object for both fields
    (``base`` equals ``seen`` for most conversations; 100,000 watches keep one copy)."""
    return same_as if value == same_as else value


def _frozen(items: Iterable[T]) -> frozenset[T]:
    """``frozenset(items)``, or the shared empty one."""
    out = frozenset(items)
    return out if out else NONE


@dataclass(frozen=True, slots=True)
class WatchState:
    """What the detector remembers about one conversation between polls (bounded in size)."""

    initialized: bool = False
    #: digests of messages seen, most recently seen first (the last answer, then a few more)
    seen: bytes = b""
    #: digests in ``seen`` of replies seen unfinished: reported when they finish
    open: frozenset[bytes] = NONE
    #: digests in ``seen`` of the answer where coverage began: unknown messages below them are history
    base: bytes = b""  # sorted, concatenated (a set would take five times the memory)
    #: ``ask --chat``: only replies newer than the follow-up can be the answer
    awaiting_follow_up: bool = False
    #: digest of the follow-up's text (to recognise it) and, once seen, of its message id
    follow_up_text: bytes = b""
    follow_up: bytes = b""
    #: unknown status values already logged for this conversation
    unknown_statuses: frozenset[str] = NONE
    #: 64 bits of a digest of the last answer's shape (an int: half the memory of its hex)
    fingerprint: int = 0
    #: Unix time the conversation was last seen to change (for ``expire_after_s``)
    last_change_at: float | None = None
    pending: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 2,
                "initialized": self.initialized,
                "seen": _b64(self.seen),
                "open": _b64(b"".join(sorted(self.open))),
                "base": _b64(self.base),
                "awaiting_follow_up": self.awaiting_follow_up,
                "follow_up_text": _b64(self.follow_up_text),
                "follow_up": _b64(self.follow_up),
                "unknown_statuses": sorted(self.unknown_statuses),
                "fingerprint": f"{self.fingerprint:016x}" if self.fingerprint else "",
                "last_change_at": self.last_change_at,
                "pending": self.pending,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> WatchState:
        """The state :meth:`to_json` wrote; :class:`DamagedState` for anything else."""
        if not text:
            return cls()
        try:
            return cls._from_dict(json.loads(text))
        except (
            ValueError,
            TypeError,
            AttributeError,
            RecursionError,
        ) as exc:  # binascii.Error is a ValueError
            raise DamagedState(f"the detector state does not parse ({type(exc).__name__})") from None

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> WatchState:
        if raw.get("v") == 2:
            seen = _unb64(raw.get("seen"))
            open_ = _frozen(_split(_unb64(raw.get("open"))))
            base = b"".join(sorted(_split(_unb64(raw.get("base")))))
        else:  # version 1 kept the ids of finished replies of the last window: all done
            seen = b"".join(digest(str(i)) for i in raw.get("known", ()))
            open_, base = NONE, b""
        last_change = raw.get("last_change_at")
        return cls(
            initialized=bool(raw.get("initialized")),
            seen=seen,
            open=open_,
            base=_shared(base, seen),
            awaiting_follow_up=bool(raw.get("awaiting_follow_up")),
            follow_up_text=_unb64(raw.get("follow_up_text")),
            follow_up=_unb64(raw.get("follow_up")),
            unknown_statuses=_frozen(str(s) for s in raw.get("unknown_statuses", ())),
            fingerprint=_fingerprint_of(raw.get("fingerprint")),
            last_change_at=float(last_change) if isinstance(last_change, int | float) else None,
            pending=bool(raw.get("pending", True)),
        )


@dataclass(frozen=True)
class Detection:
    state: WatchState
    events: tuple[Event, ...] = ()
    #: status values seen for the first time in this conversation (log once, count)
    new_unknown_statuses: tuple[str, ...] = ()
    changed: bool = False
    pending: bool = True
    #: pending, and the reply is not about to finish: none of the current turn exists yet, or
    #: every unfinished one is ``INITIATED`` and not streaming (polled at the waiting pace).
    #: False when not pending, or when a reply streams or has an unknown status (active pace).
    waiting: bool = False
    #: the answer was full and shared no message with what was seen before: newer messages
    #: may have pushed unseen ones out of the window (read again with ``limit=WINDOW_MAX``)
    window_gap: bool = False


def listed(messages: tuple[Message, ...], limit: int) -> list[tuple[bytes, Message]]:
    """The answer's first ``limit`` messages in the API's order, each id once (its first
    occurrence). Messages of every role are landmarks (seen or not); only user and assistant
    messages decide anything else."""
    out: list[tuple[bytes, Message]] = []
    ids: set[bytes] = set()
    for message in messages[:limit]:
        key = digest(message.id)
        if key not in ids:
            ids.add(key)
            out.append((key, message))
    return out


def is_pending(messages: list[Message]) -> bool:
    """Pending: no reply newer than the newest user message yet, or one of those replies (the
    current turn) unfinished. ``messages`` newest first; other roles are ignored."""
    turn: list[Message] = []
    for message in messages:
        if message.role == "user":
            break
        if message.role == "assistant":
            turn.append(message)
    return not turn or any(not m.finished for m in turn)


def is_waiting(messages: list[Message]) -> bool:
    """Pending (see :func:`is_pending`) with no reply of the current turn about to finish:
    none exists yet, or every unfinished one is ``INITIATED`` and not streaming. A ``PARTIAL``,
    streaming or unknown-status reply is not waiting (it is polled at the active pace)."""
    turn: list[Message] = []
    for message in messages:
        if message.role == "user":
            break
        if message.role == "assistant":
            turn.append(message)
    unfinished = [m for m in turn if not m.finished]
    if turn and not unfinished:
        return False  # settled
    return all(m.status == "INITIATED" and not m.is_streaming for m in unfinished)


def _fingerprint(conversation: Conversation) -> int:
    parts = [conversation.updated_at.isoformat()]
    parts += [f"{m.id}|{m.status}|{m.is_streaming}|{len(m.text)}" for m in conversation.messages]
    return int.from_bytes(hashlib.sha256("\n".join(parts).encode()).digest()[:8], "big")


def _fingerprint_of(value: object) -> int:
    """The stored fingerprint (16 hex digits); 0 for anything else, which only means the
    next answer counts as a change."""
    if isinstance(value, str) and len(value) == 16:
        with contextlib.suppress(ValueError):
            return int(value, 16)
    return 0


def _backfill_latest(messages: list[tuple[bytes, Message]]) -> bytes | None:
    """The newest reply, if it finished and no user message is newer."""
    for key, message in messages:
        if message.role == "user":
            return None
        if message.role == "assistant":
            return key if message.finished else None
    return None


def _find_follow_up(
    state: WatchState, messages: list[tuple[bytes, Message]], seen: frozenset[bytes]
) -> int | None:
    """Index of the follow-up's user message: an unknown user message whose text is what
    ``ask`` sent (whitespace aside), newer than every known message, or else newer than the
    oldest known one (a tie may list it below an older reply); the oldest such."""
    if state.follow_up:
        return next((i for i, (key, _) in enumerate(messages) if key == state.follow_up), None)
    known = [i for i, (key, _) in enumerate(messages) if key in seen] or [len(messages)]
    candidates = [
        i
        for i, (key, m) in enumerate(messages)
        if m.role == "user" and key not in seen and digest(_normal(m.text)) == state.follow_up_text
    ]
    above_all = [i for i in candidates if i < known[0]]
    above_oldest = [i for i in candidates if i < known[-1]]
    best = above_all or above_oldest
    return best[-1] if best else None


def _normal(text: str) -> str:
    return " ".join(text.split())


def _unknown_status(message: Message) -> str | None:
    if message.role != "assistant" or message.status in KNOWN_STATUSES:
        return None
    return (message.status or MISSING_STATUS)[:MAX_STATUS_CHARS]


@dataclass(frozen=True)
class _Answer:
    """One answer as the detector sees it, with where its landmarks are (indexes, newest 0)."""

    messages: list[tuple[bytes, Message]]
    #: digests seen before, most recently seen first, and as a set
    seen_order: list[bytes]
    seen: frozenset[bytes]
    #: below this index, unknown messages are history (older than what was covered)
    history_from: int
    #: with backfill latest on the first answer: the reply to report at once
    latest: bytes | None
    #: ``ask --chat``: where the follow-up is (None: not visible), or -1 when not asking
    follow_at: int | None
    #: it lists a message seen before (a landmark to tell old from new)
    anchored: bool
    #: ``ask --chat``: the first reply after the follow-up, the only one that can be the answer
    first_reply: int | None = None


def _survey(
    state: WatchState, conversation: Conversation, backfill: Backfill, limit: int
) -> tuple[_Answer, bool]:
    messages = listed(conversation.messages, limit)
    seen_order = _split(state.seen)
    seen = frozenset(seen_order)
    known_at = [i for i, (key, _) in enumerate(messages) if key in seen]
    gap = state.initialized and len(conversation.messages) >= limit and not known_at
    lowest_known = known_at[-1] if known_at else len(messages)
    based = frozenset(_split(state.base))
    top_base = next((i for i, (key, _) in enumerate(messages) if key in based), len(messages))
    latest = _backfill_latest(messages) if not state.initialized and backfill == "latest" else None
    follow_at = _find_follow_up(state, messages, seen) if state.awaiting_follow_up else -1
    history_from = min(lowest_known, top_base)
    if gap or (follow_at is not None and follow_at >= 0):
        # nothing in common with what was seen: no landmark says what is history; or ask: the
        # follow-up is the landmark, and everything listed above it is newer
        history_from = len(messages)
    first_reply = None
    if follow_at is not None and follow_at > 0:
        first_reply = max(
            (
                i
                for i in range(follow_at)
                if messages[i][1].role == "assistant"
                and (messages[i][0] not in seen or messages[i][0] in state.open)
            ),
            default=None,
        )
    answer = _Answer(messages, seen_order, seen, history_from, latest, follow_at, bool(known_at), first_reply)
    return answer, gap


def _verdict(state: WatchState, answer: _Answer, i: int, open_: set[bytes]) -> str:
    """What to do with message ``i``: "skip" (undecided, not remembered), "keep" (remember
    as it is), "open" (an unfinished reply to wait for), "done" (history, never reported) or
    "report"."""
    key, message = answer.messages[i]
    known = key in answer.seen
    if (answer.follow_at is None and not known) or (
        answer.first_reply is not None and i < answer.first_reply and message.role == "assistant"
    ):
        # ask: undecided until the follow-up is visible, it may be the answer; or a later reply
        # than the first one after the follow-up, which is the answer
        return "skip"
    below_follow_up = answer.follow_at is not None and i > answer.follow_at >= 0
    from_before = not known and state.initialized and i > answer.history_from
    if message.role != "assistant" or (known and key not in open_):
        return "keep"
    if below_follow_up or from_before:
        # ask: older than the follow-up, never the answer; or listed below what was covered:
        # history, whatever its status
        return "done"
    if not message.finished:
        return "open"
    # new (or seen unfinished before); on the first answer only the backfilled one
    return "report" if known or state.initialized or key == answer.latest else "done"


def _remember_statuses(state: WatchState, messages: list[tuple[bytes, Message]]) -> tuple[str, ...]:
    """Unknown statuses not seen before in this conversation (none once it has shown
    :data:`MAX_UNKNOWN_STATUSES` of them: the state stays bounded and nothing is logged twice)."""
    room = MAX_UNKNOWN_STATUSES - len(state.unknown_statuses)
    unknown = {s for _, m in messages if (s := _unknown_status(m)) is not None}
    return tuple(sorted(unknown - state.unknown_statuses))[: max(0, room)]


def detect(
    state: WatchState,
    conversation: Conversation,
    *,
    now: datetime,
    backfill: Backfill = "latest",
    limit: int = 20,
) -> Detection:
    """New reply events for ``conversation`` (read with ``limit``) given what ``state``
    remembers, and the new state."""
    answer, gap = _survey(state, conversation, backfill, limit)
    report: list[Message] = []
    recorded: list[bytes] = []  # digests of this answer to remember, in its order
    open_ = set(state.open)
    for i, (key, message) in enumerate(answer.messages):
        verdict = _verdict(state, answer, i, open_)
        if verdict == "skip":
            continue
        recorded.append(key)
        if verdict == "open":
            open_.add(key)
        elif verdict != "keep":
            open_.discard(key)
            if verdict == "report":
                report.append(message)

    # coverage begins (again) with the first answer and with any that lists nothing seen before
    # (a window overflow, or every landmark hidden): what is listed below it later is history
    base = set(_split(state.base))
    if not answer.anchored:
        base.update(key for key, _ in answer.messages)
    recorded_set = set(recorded)
    kept = recorded + [key for key in answer.seen_order if key not in recorded_set][:SEEN_EXTRA]
    follow_at = answer.follow_at
    follow_up = state.follow_up
    if follow_at is not None and follow_at >= 0 and not follow_up:
        follow_up = answer.messages[follow_at][0]
    new_unknown = _remember_statuses(state, answer.messages)
    if follow_at is None:
        # ask: the follow-up is not visible: pending. Never seen yet: it was just sent, no answer
        # is near (waiting); seen before but hidden from this answer: unknown, the active pace
        pending, waiting = True, not state.follow_up
    else:
        # ask: only replies newer than the follow-up count
        current = [m for _, m in answer.messages[: follow_at if follow_at >= 0 else None]]
        pending, waiting = is_pending(current), is_waiting(current)
    fingerprint = _fingerprint(conversation)
    changed = fingerprint != state.fingerprint
    seen = b"".join(kept)
    new_state = replace(
        state,
        initialized=True,
        seen=seen,
        open=_frozen(key for key in kept if key in open_),
        base=_shared(b"".join(sorted(base.intersection(kept))), seen),
        follow_up=follow_up,
        unknown_statuses=state.unknown_statuses | frozenset(new_unknown)
        if new_unknown
        else state.unknown_statuses,
        fingerprint=fingerprint,
        last_change_at=now.timestamp() if changed or state.last_change_at is None else state.last_change_at,
        pending=pending,
    )
    # oldest first, so sinks see replies in the order they were written
    events = tuple(reply_event(conversation, m, now) for m in reversed(report))
    return Detection(
        state=new_state,
        events=events,
        new_unknown_statuses=new_unknown,
        changed=changed,
        pending=pending,
        waiting=waiting,
        window_gap=gap,
    )


def follow_up_baseline(before: Conversation, message: str, *, now: datetime, limit: int) -> WatchState:
    """The state for ``ask --chat``: every message already in ``before`` (whatever its status)
    is never the answer; the answer is a reply newer than the follow-up ``message``."""
    state = detect(WatchState(), before, now=now, backfill="none", limit=limit).state
    return replace(
        state,
        open=NONE,
        awaiting_follow_up=True,
        follow_up_text=digest(_normal(message)),
        pending=True,
    )


def expired(state: WatchState, now: float, expire_after_s: float | None) -> bool:
    """True when the conversation has not changed for ``expire_after_s`` seconds."""
    if expire_after_s is None or state.last_change_at is None:
        return False
    return now - state.last_change_at >= expire_after_s
