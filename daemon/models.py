"""QA.tech chat API response models: a conversation and its messages, parsed from a body.

Pure data, no HTTP: the detector, the events and the progress display use these without
the client (:mod:`daemon.qatech`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from daemon.errors import BadResponseError
from daemon.httputil import excerpt

TERMINAL_STATUSES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
KNOWN_STATUSES = TERMINAL_STATUSES | {"INITIATED", "PARTIAL"}


def _utc(value: datetime) -> datetime:
    """In UTC; a time without a zone is taken as UTC (mixed with zoned ones, it must still
    compare). One that UTC cannot hold (year 1 at +23:59) is not a valid time."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the time is out of range in UTC") from None


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class Message(BaseModel):
    """One chat message; unknown fields are kept out, unknown statuses are kept as text."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: str
    role: Literal["user", "assistant"] | str
    created_at: Timestamp = Field(alias="createdAt")
    text: str = ""
    status: str | None = None
    is_streaming: bool = Field(False, alias="isStreaming")

    @property
    def finished(self) -> bool:
        """An assistant message in a terminal status that is no longer streaming."""
        return self.status in TERMINAL_STATUSES and not self.is_streaming


class Conversation(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    short_id: str = Field(alias="shortId")
    url: str = ""
    title: str | None = None
    created_at: Timestamp = Field(alias="createdAt")
    updated_at: Timestamp = Field(alias="updatedAt")
    messages: tuple[Message, ...] = ()


def parse_conversation(raw: bytes) -> Conversation:
    """Parse a GET body; a body of the wrong shape raises :class:`BadResponseError`."""
    try:
        return Conversation.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = excerpt(str(first["msg"]), 80)
        raise BadResponseError(
            f"unexpected response body ({where}: {message})", excerpt=excerpt(raw)
        ) from None
    except (ValueError, RecursionError):  # anything else the parser cannot take is a bad answer too
        raise BadResponseError("unexpected response body (cannot be parsed)", excerpt=excerpt(raw)) from None


def conversation_of(short_id: str, raw: bytes) -> Conversation:
    """:func:`parse_conversation` of the answer for ``short_id``; events name the conversation
    the user watches, whatever the body says."""
    conversation = parse_conversation(raw)
    if conversation.short_id != short_id:
        conversation = conversation.model_copy(update={"short_id": short_id})
    return conversation
