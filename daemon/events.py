"""The event every sink receives: one JSON object, as in the design's "Event" section."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon.models import Conversation, Message

REPLY_TYPES = {
    "COMPLETED": "chat.reply.completed",
    "FAILED": "chat.reply.failed",
    "CANCELLED": "chat.reply.cancelled",
}
WATCH_ENDED = "chat.watch.ended"
END_REASONS = ("not_found", "expired", "removed", "rejected")


def rfc3339(when: datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix: ``2026-11-27T10:15:02.113Z``."""
    return when.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def shown_time(ts: float | None, now: float) -> str:
    """A Unix time for a table: RFC 3339 in UTC to the second, and how long ago (or until)."""
    if ts is None:
        return "-"
    delta = ts - now
    when = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{when} ({'in ' if delta > 0 else ''}{_span(abs(delta))}{'' if delta > 0 else ' ago'})"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _digest(*parts: str) -> str:
    return "evt_" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def reply_event_id(short_id: str, message_id: str) -> str:
    """Deterministic: the same reply has the same id on every retry, restart and sink."""
    return _digest("reply", short_id, message_id)


def ended_event_id(short_id: str, reason: str, watch_started_at: float) -> str:
    return _digest("ended", short_id, reason, repr(round(watch_started_at, 6)))


@dataclass(frozen=True)
class Event:
    type: str
    id: str
    timestamp: str
    data: dict[str, Any]

    @property
    def short_id(self) -> str:
        return str(self.data["conversation"]["shortId"])

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "timestamp": self.timestamp, "data": self.data}

    def to_json(self) -> str:
        """Compact JSON, one line: the exact bytes written to files and signed for webhooks."""
        return json.dumps(self.as_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Event:
        raw = json.loads(text)
        return cls(type=raw["type"], id=raw["id"], timestamp=raw["timestamp"], data=raw["data"])


def reply_event(conversation: Conversation, message: Message, now: datetime) -> Event:
    status = message.status or ""
    return Event(
        type=REPLY_TYPES[status],
        id=reply_event_id(conversation.short_id, message.id),
        timestamp=rfc3339(now),
        data={
            "conversation": {
                "shortId": conversation.short_id,
                "url": conversation.url,
                "title": conversation.title,
            },
            "message": {
                "id": message.id,
                "role": message.role,
                "status": status,
                "createdAt": rfc3339(message.created_at),
                "text": message.text,
            },
        },
    )


def watch_ended_event(short_id: str, reason: str, watch_started_at: float, now: datetime) -> Event:
    return Event(
        type=WATCH_ENDED,
        id=ended_event_id(short_id, reason, watch_started_at),
        timestamp=rfc3339(now),
        data={"conversation": {"shortId": short_id}, "reason": reason},
    )
