"""HTTP helpers that the API client (:mod:`daemon.qatech`) and the webhook sink share."""

from __future__ import annotations

import email.utils
import re
from datetime import UTC

from daemon.logs import scrub, scrub_cut

EXCERPT_CHARS = 120


def excerpt(raw: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    """A one-line, bounded excerpt for logs and errors. Known secrets are scrubbed before it is
    cut, and so is the start of one that a cut of ``raw`` (a body read only in part) left at its
    end: no part of a secret survives."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = scrub_cut(scrub(" ".join(text.split())))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (a Unix time): delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"-?\d{1,12}(\.\d{1,9})?", value):  # delta-seconds (no inf, nan or 1e9 forms)
        delay = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = when.timestamp() - now
    # 0, a negative delay or a past date say "now": callers put their own floor under it
    return max(0.0, delay)
