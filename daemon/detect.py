"""Which messages become events: a pure function of (stored state, fresh conversation, now).

No I/O and no clock reads here; see "Which messages become events" in the design.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from daemon.events import Event, reply_event
from daemon.qatech import KNOWN_STATUSES, Conversation, Message

Backfill = Literal["latest", "none"]
MISSING_STATUS = "<missing>"


@dataclass(frozen=True)
class WatchState:
    """What the detector remembers about one conversation between polls."""

    initialized: bool = False
    #: finished assistant messages already reported or taken as history, within the window
    known: frozenset[str] = frozenset()
    #: createdAt of the oldest message of the last full window; anything older is history
    floor: datetime | None = None
    #: unknown status values already logged for this conversation
    unknown_statuses: frozenset[str] = frozenset()
    fingerprint: str = ""
    #: Unix time the conversation was last seen to change (for ``expire_after_s``)
    last_change_at: float | None = None
    pending: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "initialized": self.initialized,
                "known": sorted(self.known),
                "floor": self.floor.isoformat() if self.floor else None,
                "unknown_statuses": sorted(self.unknown_statuses),
                "fingerprint": self.fingerprint,
                "last_change_at": self.last_change_at,
                "pending": self.pending,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> WatchState:
        if not text:
            return cls()
        raw: dict[str, Any] = json.loads(text)
        floor = raw.get("floor")
        return cls(
            initialized=bool(raw.get("initialized")),
            known=frozenset(raw.get("known", ())),
            floor=datetime.fromisoformat(floor) if floor else None,
            unknown_statuses=frozenset(raw.get("unknown_statuses", ())),
            fingerprint=str(raw.get("fingerprint", "")),
            last_change_at=raw.get("last_change_at"),
            pending=bool(raw.get("pending", True)),
        )


@dataclass(frozen=True)
class Detection:
    state: WatchState
    events: tuple[Event, ...] = ()
    #: status values seen for the first time in this conversation (log once, count)
    new_unknown_statuses: tuple[str, ...] = ()
    changed: bool = False
    pending: bool = field(default=True)


def _newest_first(messages: tuple[Message, ...]) -> list[Message]:
    # The API promises newest first; a stable sort keeps that order for equal timestamps.
    return sorted(messages, key=lambda m: m.created_at, reverse=True)


def is_pending(messages: list[Message]) -> bool:
    """Pending: no messages, the newest is the user's, or the newest reply is unfinished."""
    if not messages or messages[0].role != "assistant":
        return True
    return not messages[0].finished


def _fingerprint(conversation: Conversation) -> str:
    parts = [conversation.updated_at.isoformat()]
    parts += [f"{m.id}|{m.status}|{m.is_streaming}|{len(m.text)}" for m in conversation.messages]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _latest_backfill(messages: list[Message]) -> str | None:
    """The newest message, if it is a finished assistant reply (newer than every user message)."""
    if messages and messages[0].role == "assistant" and messages[0].finished:
        return messages[0].id
    return None


def detect(
    state: WatchState,
    conversation: Conversation,
    *,
    now: datetime,
    backfill: Backfill = "latest",
    limit: int = 20,
) -> Detection:
    """New reply events for ``conversation`` given what ``state`` remembers, and the new state."""
    messages = _newest_first(conversation.messages)
    replies = [m for m in messages if m.role == "assistant"]
    unknown = {m.status or MISSING_STATUS for m in replies if m.status not in KNOWN_STATUSES}
    new_unknown = tuple(sorted(unknown - state.unknown_statuses))

    # messages older than the floor are history; the floor message itself was inside the last
    # window, so it counts (it may have been the reply still streaming then)
    fresh = [
        m
        for m in replies
        if m.finished and m.id not in state.known and (state.floor is None or m.created_at >= state.floor)
    ]
    if state.initialized:
        to_report = fresh
    else:
        latest = _latest_backfill(messages) if backfill == "latest" else None
        to_report = [m for m in fresh if m.id == latest]
    # oldest first, so sinks see replies in the order they were written
    events = tuple(reply_event(conversation, m, now) for m in reversed(to_report))

    window_ids = {m.id for m in messages}
    known = {i for i in state.known if i in window_ids} | {m.id for m in fresh}
    floor = messages[-1].created_at if len(messages) >= limit else state.floor
    fingerprint = _fingerprint(conversation)
    changed = fingerprint != state.fingerprint
    pending = is_pending(messages)
    new_state = replace(
        state,
        initialized=True,
        known=frozenset(known),
        floor=floor,
        unknown_statuses=state.unknown_statuses | unknown,
        fingerprint=fingerprint,
        last_change_at=now.timestamp() if changed or state.last_change_at is None else state.last_change_at,
        pending=pending,
    )
    return Detection(
        state=new_state,
        events=events,
        new_unknown_statuses=new_unknown,
        changed=changed,
        pending=pending,
    )


def expired(state: WatchState, now: float, expire_after_s: float | None) -> bool:
    """True when the conversation has not changed for ``expire_after_s`` seconds."""
    if expire_after_s is None or state.last_change_at is None:
        return False
    return now - state.last_change_at >= expire_after_s
