"""`qawatch demo`: the simulator and the daemon in one process, no token needed.

Starts the simulator, asks a few questions through its API, watches the chats with the real
daemon (store, poller, outbox) and prints each reply readably as it finishes, with a live
line of what is still pending. Exits 0 when every chat has its reply.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, TextIO

from daemon import logs
from daemon.app import App
from daemon.errors import ExitCode
from daemon.settings import Settings
from daemon.simulator import SimConfig, Simulator
from daemon.sinks.memory import MemorySink

QUESTIONS = (
    "Does the signup form reject an invalid email address?",
    "Can a user reset their password from the login page?",
    "Is the checkout button disabled while the cart is empty?",
    "Does the dashboard load in under two seconds?",
    "Are error messages announced to screen readers?",
    "Does the search box handle unicode input?",
    "Can an admin export the user list as CSV?",
    "Does logout clear the session cookie?",
)
DEMO_TIMEOUT_S = 50.0
SYMBOLS = {"COMPLETED": "✔", "FAILED": "✘", "CANCELLED": "⊘"}


class Screen:
    """Prints replies as blocks and keeps one live status line at the bottom of a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last_status = ""

    def _clear(self) -> None:
        if self.tty and self._last_status:
            self.out.write("\r\033[K")

    def status(self, line: str) -> None:
        if line == self._last_status:
            return
        if self.tty:
            self._clear()
            self.out.write(line)
        else:
            self.out.write(line + "\n")
        self._last_status = line
        self.out.flush()

    def block(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        if self.tty and self._last_status:
            self.out.write(self._last_status)
        self.out.flush()

    def done(self) -> None:
        self._clear()
        self._last_status = ""
        self.out.flush()


def _format_reply(event: dict[str, Any], question: str, elapsed: float) -> str:
    message = event["data"]["message"]
    status = message["status"]
    body = textwrap.fill(message["text"], width=76, initial_indent="   A: ", subsequent_indent="      ")
    return (
        f"{SYMBOLS.get(status, '?')} {event['data']['conversation']['shortId']}  {status} "
        f"after {elapsed:.1f}s\n   Q: {question}\n{body}"
    )


async def run_demo(
    stop: asyncio.Event, *, chats: int = 4, reply_s: float = 4.0, out: TextIO | None = None
) -> int:
    logs.configure("warning", "auto")
    screen = Screen(out or sys.stdout)
    sim = Simulator(SimConfig(reply_s=reply_s, seed=7))
    base_url = await sim.start()
    questions: dict[str, str] = {}
    finished: dict[str, str] = {}
    started = time.monotonic()

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == "chat.watch.ended":
            return
        short_id = event["data"]["conversation"]["shortId"]
        finished[short_id] = event["data"]["message"]["status"]
        screen.block(_format_reply(event, questions.get(short_id, "?"), time.monotonic() - started))

    try:
        screen.block(f"qawatch demo: simulated QA.tech API at {base_url}")
        for index, question in enumerate(QUESTIONS[:chats]):
            # vary the pace, and let the last reply fail to show how that looks
            outcome = "FAILED" if chats > 2 and index == chats - 1 else "COMPLETED"
            short_id = sim.create_chat(question, reply_s=reply_s * (0.6 + 0.3 * index), outcome=outcome)
            questions[short_id] = question
        screen.block(f"asked {len(questions)} questions; waiting for the replies\n")
        with tempfile.TemporaryDirectory(prefix="qawatch-demo-") as tmp:
            settings = Settings(
                api={"base_url": base_url, "token": sim.config.token, "rate_limit_per_s": 20},
                poll={"active_interval_s": 0.5, "idle_interval_s": 5, "jitter": 0.1},
                watch={"ids": list(questions), "file": None, "backfill": "latest"},
                state={"path": Path(tmp) / "demo.db"},
                sinks=[],
                log={"level": "warning", "format": "auto"},
                control={"listen": None},
            )
            sink = MemorySink("demo", on_event=on_event)
            app = App(settings, sim.config.token, sinks=[sink])
            app_stop = asyncio.Event()
            runner = asyncio.create_task(app.run(app_stop))
            code = await _wait_all(screen, questions, finished, stop, started)
            app_stop.set()
            await runner
        failed = sum(1 for status in finished.values() if status != "COMPLETED")
        screen.done()
        screen.block(
            f"\n{len(finished)} of {len(questions)} replies delivered "
            f"({failed} not completed) in {time.monotonic() - started:.1f}s"
        )
        return code
    finally:
        await sim.stop()


async def _wait_all(
    screen: Screen,
    questions: dict[str, str],
    finished: dict[str, str],
    stop: asyncio.Event,
    started: float,
) -> int:
    spinner = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    tick = 0
    while len(finished) < len(questions):
        elapsed = time.monotonic() - started
        if stop.is_set():
            return ExitCode.OK
        if elapsed > DEMO_TIMEOUT_S:
            screen.done()
            return ExitCode.TIMEOUT
        pending = [short_id for short_id in questions if short_id not in finished]
        if screen.tty:
            spin = spinner[tick % len(spinner)]
            screen.status(f"{spin} waiting for {len(pending)}: {', '.join(pending)}  ({elapsed:.0f}s)")
        else:
            screen.status(f"… waiting for {len(pending)}: {', '.join(pending)}")
        tick += 1
        await asyncio.sleep(0.1)
    return ExitCode.OK
