"""Upstream-wide trouble as one incident: a line when it starts, a summary while it lasts, a line
when it ends, instead of one warning per watched conversation.

Pure: the caller passes ``now`` (monotonic seconds) and logs what the methods return.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: conversations failing one after another (no success between) that make trouble upstream-wide
OUTAGE_AFTER_CONVERSATIONS = 3
#: successful polls in a row that end it, once no poll failed for OUTAGE_QUIET_S (an API that
#: fails only part of the time is one long incident, not one that ends and starts again)
OUTAGE_CLEARS_AFTER = 3
OUTAGE_QUIET_S = 30.0
#: a summary line at most this often while it lasts
OUTAGE_SUMMARY_EVERY_S = 60.0


@dataclass
class OutageEnd:
    duration_s: float
    failed_polls: int
    conversations: int


@dataclass
class Outage:
    """Counts failed and successful polls of every conversation together."""

    failures_in_a_row: int = 0
    failing: set[str] = field(default_factory=set)  # conversations that failed since the last success
    successes_in_a_row: int = 0
    since: float | None = None  # when the incident started (None: no incident)
    last_summary: float = 0.0
    failed_polls: int = 0
    conversations: set[str] = field(default_factory=set)
    last_failure: float = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, short_id: str, now: float) -> str | None:
        """Record a failed poll: "start" when this makes an incident, "summary" when one is
        due, else None."""
        self.failures_in_a_row += 1
        self.successes_in_a_row = 0
        self.last_failure = now
        if self.since is None:
            self.failing.add(short_id)
            if len(self.failing) < OUTAGE_AFTER_CONVERSATIONS:
                return None
            self.since = self.last_summary = now
            self.failed_polls = self.failures_in_a_row
            self.conversations, self.failing = self.failing, set()
            return "start"
        self.failed_polls += 1
        self.conversations.add(short_id)
        if now - self.last_summary >= OUTAGE_SUMMARY_EVERY_S:
            self.last_summary = now
            return "summary"
        return None

    def succeeded(self, now: float) -> OutageEnd | None:
        """Record a successful poll; the incident's figures when this ends it."""
        self.failures_in_a_row = 0
        self.failing = set()
        self.successes_in_a_row += 1
        if self.since is None or self.successes_in_a_row < OUTAGE_CLEARS_AFTER:
            return None
        if now - self.last_failure < OUTAGE_QUIET_S:
            return None
        end = OutageEnd(now - self.since, self.failed_polls, len(self.conversations))
        self.since = None
        self.failed_polls = 0
        self.conversations = set()
        return end
