"""What `watch` and `ask` show on stderr while they wait, so that a CI step never waits in silence.

* On a terminal: one status line per conversation (waiting for the reply, streaming N
  characters, finished; elapsed time), redrawn in place with rich; the conversation's URL is
  printed once. Where ``NO_COLOR`` is set or ``TERM=dumb``: one plain line redrawn with a
  carriage return, no escape codes.
* Elsewhere (a CI log, a file): one line per unfinished conversation every ``every_s`` seconds.
* ``--quiet``: nothing but diagnostics.

The pure parts (which reply a conversation is writing, how a status reads, when a line is due)
are functions of their arguments; :class:`Display` only writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from daemon.logs import scrub
from daemon.models import Conversation, Message

Mode = Literal["off", "lines", "plain", "live"]

#: how much of a reply's text a failure or timeout line quotes
TEXT_LIMIT = 500
#: how often a terminal display is redrawn (its elapsed time moves by the second)
REDRAW_S = 0.5


def choose_mode(*, quiet: bool, isatty: bool, env: Mapping[str, str]) -> Mode:
    """``off`` with ``--quiet``; ``lines`` off a terminal; on one, ``plain`` where ``NO_COLOR``
    is set (not empty, as no-color.org says) or ``TERM=dumb``, else ``live``."""
    if quiet:
        return "off"
    if not isatty:
        return "lines"
    if env.get("NO_COLOR") or env.get("TERM", "").strip().lower() == "dumb":
        return "plain"
    return "live"


def current_reply(conversation: Conversation, *, follow_up_seen: bool = True) -> Message | None:
    """The reply being written: the newest assistant message newer than every user message
    (the API lists newest first), or None when the turn has no reply yet. ``follow_up_seen``
    False (``ask --chat`` before its follow-up is visible): nothing there is the reply yet."""
    if not follow_up_seen:
        return None
    for message in conversation.messages:
        if message.role == "user":
            return None
        if message.role == "assistant":
            return message
    return None


def one_line(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``limit`` characters
    with an ellipsis, registered secrets scrubbed."""
    flat = " ".join(scrub(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def format_elapsed(seconds: float) -> str:
    """``7s``, ``1m05s``, ``2h03m``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass
class Status:
    """One conversation's wait, as the display shows it."""

    short_id: str
    started: float
    url: str = ""
    url_shown: bool = False
    #: characters of the reply being written; None while there is none
    chars: int | None = None
    #: how the wait ended: a reply status (COMPLETED, FAILED, CANCELLED) or a short reason
    outcome: str | None = None
    ended_at: float | None = None
    #: the last transient error, until an answer arrives
    trouble: str | None = None
    last_line: float = 0.0

    def state(self) -> str:
        if self.outcome is not None:
            return f"finished ({self.outcome})" if self.outcome.isupper() else self.outcome
        if self.chars:
            return f"streaming {self.chars} character{'s' if self.chars != 1 else ''}"
        return "waiting for the reply"

    def elapsed(self, now: float) -> float:
        return (self.ended_at if self.ended_at is not None else now) - self.started


def status_line(status: Status, now: float) -> str:
    """The terminal's line: ``chat_abc  streaming 120 characters  1m05s``."""
    trouble = f"  (retrying: {status.trouble})" if status.trouble and status.outcome is None else ""
    return f"{status.short_id}  {status.state()}  {format_elapsed(status.elapsed(now))}{trouble}"


def progress_line(status: Status, now: float) -> str:
    """The line off a terminal; with the URL while it has not been shown."""
    line = f"qawatch: {status.short_id}: {status.state()}, {format_elapsed(status.elapsed(now))} elapsed"
    if status.url and not status.url_shown:
        line += f", {status.url}"
    if status.trouble:
        line += f" (retrying: {status.trouble})"
    return line


def due(status: Status, now: float, every_s: float) -> bool:
    """A progress line is due: the wait goes on and ``every_s`` passed since the last one
    (or since it began)."""
    return status.outcome is None and now - max(status.last_line, status.started) >= every_s


def failure_line(short_id: str, status: str, text: str, url: str) -> str:
    """``qawatch: chat_abc: the reply FAILED: <text> (<url>)``, one line, the text bounded."""
    said = one_line(text) or "(no text)"
    where = f" ({url})" if url else ""
    return f"qawatch: {short_id}: the reply {status}: {said}{where}"


class _Board:
    """The live part rich redraws: one line per conversation, read at each refresh."""

    def __init__(self, display: Display) -> None:
        self.display = display

    def __rich__(self) -> Group:
        now = self.display.clock()
        statuses = list(self.display.statuses.values())
        # taller than the terminal, rich cannot redraw in place (each redraw would fill the
        # scrollback): the unfinished first, then one line for the rest
        shown = board_rows(len(statuses), self.display.rows())
        if shown < len(statuses):
            statuses.sort(key=lambda status: status.outcome is not None)
        lines = []
        for status in statuses[:shown]:
            if status.outcome is None:
                style = "cyan" if status.chars else "yellow"
            else:
                style = "green" if status.outcome == "COMPLETED" else "red"
            lines.append(Text(status_line(status, now), style=style, no_wrap=True, overflow="ellipsis"))
        if shown < len(statuses):
            done = sum(1 for status in statuses[shown:] if status.outcome is not None)
            lines.append(
                Text(f"... and {len(statuses) - shown} more ({done} of them finished)", no_wrap=True)
            )
        return Group(*lines)


def board_rows(conversations: int, terminal_rows: int) -> int:
    """How many status lines fit on a terminal of ``terminal_rows``: all of them, or as many as
    leave a row for the cursor and one for the "... and N more" line."""
    if conversations <= terminal_rows - 1:
        return conversations
    return max(1, terminal_rows - 2)


class Display:
    """Progress on ``stream`` (stderr) in ``mode``; diagnostics go through :meth:`print` and
    stdout lines through :meth:`emit`, so that neither tears the live part. Use as an async
    context manager: it redraws (or writes due lines) until the block ends."""

    def __init__(
        self,
        stream: TextIO,
        mode: Mode = "off",
        *,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.mode = mode
        self.every_s = every_s
        self.clock = clock
        self.statuses: dict[str, Status] = {}
        self._console: Console | None = None
        self._live: Live | None = None
        self._plain_shown = ""  # the plain line now on screen
        self._ticker: asyncio.Task[None] | None = None

    # -- what the waits tell it

    def rows(self) -> int:
        """The terminal's height (24 when unknown)."""
        return self._console.size.height if self._console is not None else 24

    def add(self, short_id: str, *, url: str = "", url_shown: bool = False) -> None:
        if short_id not in self.statuses:
            self.statuses[short_id] = Status(short_id, self.clock(), url=url, url_shown=url_shown)

    def observed(self, short_id: str, *, url: str, reply: Message | None) -> None:
        """An answer arrived: the reply being written (None: none yet)."""
        status = self.statuses[short_id]
        status.trouble = None
        if reply is None or not reply.finished:  # a finished one is reported (finished()) next
            status.chars = len(reply.text) if reply is not None else None
        if url and not status.url:
            status.url = url
        if status.url and not status.url_shown and self.mode in ("live", "plain"):
            status.url_shown = True
            self.print(f"qawatch: {short_id}: {status.url}")
        self._redraw()

    def trouble(self, short_id: str, error: str) -> None:
        self.statuses[short_id].trouble = one_line(error.removeprefix(f"{short_id}: "), 200)
        self._redraw()

    def finished(self, short_id: str, outcome: str) -> None:
        """The wait ended: a reply status, or a reason (``timed out``, ``not found``)."""
        status = self.statuses[short_id]
        if status.outcome is None:
            status.outcome, status.ended_at = outcome, self.clock()
        self._redraw()

    # -- writing

    def print(self, line: str) -> None:
        """A permanent line on stderr (above the live part)."""
        with self._cleared():
            self.stream.write(line.rstrip("\n") + "\n")
            self.stream.flush()

    def emit(self, out: TextIO, line: str) -> None:
        """A line on ``out`` (stdout): the live part steps aside if both are one terminal."""
        with self._cleared():
            out.write(line.rstrip("\n") + "\n")
            out.flush()

    @contextlib.contextmanager
    def _cleared(self) -> Iterator[None]:
        if self._live is not None:
            self._live.stop()  # transient: erases what it drew
            try:
                yield
            finally:
                self._start_live()  # a new one: the old one's idea of the screen is stale
        elif self.mode == "plain" and self._plain_shown:
            self.stream.write("\r" + " " * len(self._plain_shown) + "\r")
            self._plain_shown = ""
            try:
                yield
            finally:
                self._redraw()
        else:
            yield

    def _redraw(self) -> None:
        if self._live is not None:
            self._live.refresh()
        elif self.mode == "plain" and self._ticker is not None:
            self._plain()

    def _plain(self) -> None:
        now = self.clock()
        line = " | ".join(status_line(s, now) for s in self.statuses.values())
        width = max(10, (self._console.width if self._console else 80) - 1)
        text = Text(line, no_wrap=True, overflow="ellipsis")
        text.truncate(width, overflow="ellipsis")
        shown = text.plain
        if shown != self._plain_shown:
            self.stream.write("\r" + shown.ljust(len(self._plain_shown)))
            self.stream.flush()
            self._plain_shown = shown

    def _lines(self) -> None:
        now = self.clock()
        for status in self.statuses.values():
            if due(status, now, self.every_s):
                self.stream.write(progress_line(status, now) + "\n")
                status.last_line = now
                status.url_shown = status.url_shown or bool(status.url)
        self.stream.flush()

    # -- lifetime

    async def _tick(self) -> None:
        period = REDRAW_S if self.mode != "lines" else min(1.0, self.every_s / 4)
        while True:
            await asyncio.sleep(period)
            if self.mode == "lines":
                self._lines()
            else:
                self._redraw()

    def _start_live(self) -> None:
        assert self._console is not None
        self._live = Live(_Board(self), console=self._console, auto_refresh=False, transient=True)
        self._live.start(refresh=True)

    async def __aenter__(self) -> Display:
        if self.mode == "off":
            return self
        if self.mode in ("live", "plain"):
            # on a terminal by choice of mode (FORCE_COLOR and the like do not decide it)
            self._console = Console(
                file=self.stream, force_terminal=True, no_color=self.mode == "plain", highlight=False
            )
        if self.mode == "live":
            self._start_live()
        self._ticker = asyncio.create_task(self._tick())
        self._redraw()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()
            assert self._console is not None
            self._console.print(_Board(self))  # the final state stays on screen
        elif self.mode == "plain":
            self._plain()
            self.stream.write("\n")
            self.stream.flush()
            self._plain_shown = ""
        self._ticker = None


def stderr_display(*, quiet: bool, every_s: float) -> Display:
    """The display of `watch` and `ask`: on stderr, in the mode its terminal (or not) and the
    environment call for."""
    mode = choose_mode(quiet=quiet, isatty=sys.stderr.isatty(), env=os.environ)
    return Display(sys.stderr, mode, every_s=every_s)
