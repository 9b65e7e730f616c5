"""`watch` and `ask` as CI steps (issue 9): progress on stderr, loud failures, fast errors.

The pure parts first, then real subprocesses against a simulator thread: stderr on a pipe (a
CI log) and on a pseudo-terminal (a person at a terminal)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyte
import pytest
from support import CALL_TIMEOUT_S, QAWATCH, closed_port

from daemon.models import Conversation
from daemon.progress import (
    Status,
    board_rows,
    choose_mode,
    current_reply,
    due,
    failure_line,
    format_elapsed,
    one_line,
    progress_line,
    status_line,
)
from daemon.simulator import CANCELLED_TEXT, FAILED_TEXT, SimConfig, SimulatorThread

# ---------------------------------------------------------------------------------------
# the pure parts


@pytest.mark.parametrize(
    ("quiet", "isatty", "env", "mode"),
    [
        (True, True, {}, "off"),
        (True, False, {}, "off"),
        (False, False, {"TERM": "xterm"}, "lines"),
        (False, False, {"NO_COLOR": "1"}, "lines"),
        (False, True, {"TERM": "xterm-256color"}, "live"),
        (False, True, {"TERM": "xterm", "NO_COLOR": ""}, "live"),  # empty: not set (no-color.org)
        (False, True, {"TERM": "xterm", "NO_COLOR": "1"}, "plain"),
        (False, True, {"TERM": "dumb"}, "plain"),
    ],
)
def test_the_mode_follows_quiet_the_terminal_no_color_and_term(
    quiet: bool, isatty: bool, env: dict[str, str], mode: str
) -> None:
    assert choose_mode(quiet=quiet, isatty=isatty, env=env) == mode


def _message(role: str, text: str = "", status: str | None = None, streaming: bool = False) -> dict[str, Any]:
    return {
        "id": f"m{text}{role}{status}",
        "role": role,
        "createdAt": "2026-01-01T00:00:00Z",
        "text": text,
        "status": status,
        "isStreaming": streaming,
    }


def _conversation(*messages: dict[str, Any]) -> Conversation:
    now = "2026-01-01T00:00:00Z"
    return Conversation.model_validate(
        {
            "shortId": "chat_a",
            "url": "https://x/chat_a",
            "createdAt": now,
            "updatedAt": now,
            "messages": messages,
        }
    )


def test_the_current_reply_is_the_newest_reply_after_the_newest_user_message() -> None:
    """1. newest first: a streaming reply over the question is the one 2. a user message newest:
    no reply yet 3. other roles are skipped 4. ask --chat before its follow-up shows: none."""
    streaming = _message("assistant", "Hal", "PARTIAL", streaming=True)
    conversation = _conversation(streaming, _message("user", "q"), _message("assistant", "old", "COMPLETED"))
    reply = current_reply(conversation)
    assert reply is not None
    assert reply.text == "Hal"
    assert (
        current_reply(_conversation(_message("user", "q2"), _message("assistant", "old", "COMPLETED")))
        is None
    )
    noted = current_reply(_conversation(_message("system", "note"), streaming, _message("user", "q")))
    assert noted is not None
    assert noted.text == "Hal"
    assert current_reply(conversation, follow_up_seen=False) is None
    assert current_reply(_conversation()) is None


def test_a_status_reads_waiting_streaming_finished_with_the_elapsed_time() -> None:
    status = Status("chat_a", started=100.0)
    assert status_line(status, 107.2) == "chat_a  waiting for the reply  7s"
    status.chars = 1
    assert "streaming 1 character  " in status_line(status, 107.0)
    status.chars = 120
    status.trouble = "cannot reach http://x"
    assert (
        status_line(status, 165.0)
        == "chat_a  streaming 120 characters  1m05s  (retrying: cannot reach http://x)"
    )
    status.outcome, status.ended_at = "FAILED", 170.0
    assert status_line(status, 999.0) == "chat_a  finished (FAILED)  1m10s"  # elapsed stops at the end
    status.outcome = "timed out"
    assert status_line(status, 999.0) == "chat_a  timed out  1m10s"


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (7380, "2h03m")]
)
def test_elapsed_reads_like_a_clock(seconds: float, text: str) -> None:
    assert format_elapsed(seconds) == text


def test_a_progress_line_is_due_every_period_and_names_the_url_once() -> None:
    """1. not due before the period 2. due after it, again a period after the last line
    3. the URL is on a line while it was not shown 4. a finished wait is never due."""
    status = Status("chat_a", started=0.0, url="https://x/chat_a")
    assert not due(status, 29.9, 30.0)
    assert due(status, 30.0, 30.0)
    assert (
        progress_line(status, 30.0) == "qawatch: chat_a: waiting for the reply, 30s elapsed, https://x/chat_a"
    )
    status.last_line, status.url_shown = 30.0, True
    assert not due(status, 59.0, 30.0)
    assert due(status, 60.0, 30.0)
    assert "https://" not in progress_line(status, 60.0)
    status.outcome = "COMPLETED"
    assert not due(status, 1000.0, 30.0)


def test_a_failure_line_is_one_bounded_line_with_the_url() -> None:
    text = "first line\n\n  second\tline " + "x" * 2000
    line = failure_line("chat_a", "FAILED", text, "https://x/chat_a")
    assert line.startswith("qawatch: chat_a: the reply FAILED: first line second line xxx")
    assert line.endswith("… (https://x/chat_a)")
    assert "\n" not in line
    assert len(line) < 600
    assert failure_line("chat_a", "CANCELLED", "", "") == "qawatch: chat_a: the reply CANCELLED: (no text)"
    assert one_line("a  b\nc") == "a b c"


# ---------------------------------------------------------------------------------------
# subprocesses: stderr on a pipe


@pytest.fixture
def sim_thread() -> Iterator[SimulatorThread]:
    """A simulator on its own thread; replies take 4 s unless a test says otherwise."""
    with SimulatorThread(SimConfig(token="qwt-progress-token", reply_s=4.0, seed=3)) as thread:
        yield thread


@pytest.fixture
def env(subprocess_env: dict[str, str], sim_thread: SimulatorThread) -> dict[str, str]:
    base = {
        k: v for k, v in subprocess_env.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "COLUMNS")
    }
    return {
        **base,
        "QAWATCH_API__TOKEN": sim_thread.sim.config.token,
        "QAWATCH_API__BASE_URL": sim_thread.base_url,
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.2",
        # every phase at 0.2 s: these tests look at what the display shows while streaming
        "QAWATCH_POLL__WAITING_INTERVAL_S": "null",
        "QAWATCH_POLL__JITTER": "0",
        "QAWATCH_POLL__ERROR_BACKOFF_MAX_S": "0.3",
    }


def run(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [*QAWATCH, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def only_event(stdout: str) -> dict[str, Any]:
    """stdout holds exactly one line: the event."""
    (line,) = stdout.splitlines()
    event: dict[str, Any] = json.loads(line)
    return event


def test_off_a_terminal_a_progress_line_comes_every_period(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a reply that takes 4 s 2. watch --progress-every 1s, stderr a pipe 3. a line at least
    every second: waiting, then streaming; the URL on the first only 4. stdout: the event alone."""
    short_id = sim_thread.sim.create_chat("slow question", reply_s=8.0)  # 2.4 s before it streams
    code, out, err, _ = run("watch", short_id, "--progress-every", "1s", env=env, cwd=tmp_path)
    assert code == 0, err
    assert only_event(out)["data"]["message"]["status"] == "COMPLETED"
    lines = err.splitlines()
    assert len(lines) >= 5, err
    assert all(re.fullmatch(rf"qawatch: {short_id}: .+, \d+s elapsed.*", line) for line in lines), err
    assert "waiting for the reply" in lines[0]
    assert any("streaming" in line for line in lines), err
    url = f"https://app.qa.tech/chat/{short_id}"
    assert url in lines[0]
    assert err.count(url) == 1
    assert "\x1b" not in err
    assert "\r" not in err


def test_quiet_turns_progress_off(env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread) -> None:
    """1. the same wait with --quiet 2. nothing on stderr, the event on stdout."""
    short_id = sim_thread.sim.create_chat("slow question", reply_s=2.0)
    code, out, err, _ = run("watch", short_id, "--progress-every", "0.5s", "--quiet", env=env, cwd=tmp_path)
    assert code == 0, err
    assert err == ""
    assert only_event(out)["data"]["conversation"]["shortId"] == short_id


def test_a_timeout_names_the_reply_so_far_and_the_url(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a reply streaming for 10 s 2. watch --timeout 5s 3. exit 3; the last stderr line names
    the id, the text so far (bounded, one line) and the URL; stdout is empty."""
    short_id = sim_thread.sim.create_chat("a long question", reply_s=10.0)
    code, out, err, _ = run("watch", short_id, "--timeout", "5s", "--quiet", env=env, cwd=tmp_path)
    assert code == 3, err
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"qawatch: {short_id}: no finished reply within 5s; the reply so far (")
    assert "characters): Answer to 'a long question'" in line
    assert line.endswith(f"(https://app.qa.tech/chat/{short_id})")


# ---------------------------------------------------------------------------------------
# loud failures


@pytest.mark.parametrize(("outcome", "text"), [("FAILED", FAILED_TEXT), ("CANCELLED", CANCELLED_TEXT)])
def test_a_failed_or_cancelled_reply_is_named_on_stderr_with_its_text_and_url(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, outcome: str, text: str
) -> None:
    """1. a reply that ends FAILED or CANCELLED 2. watch --quiet (progress off, not failures)
    3. exit 1; stdout: the event alone; stderr: one line with the status, its text and the URL."""
    short_id = sim_thread.sim.create_chat("q", outcome=outcome, reply_s=0.5)
    code, out, err, _ = run("watch", short_id, "--quiet", env=env, cwd=tmp_path)
    assert code == 1, err
    assert only_event(out)["data"]["message"]["status"] == outcome
    (line,) = err.splitlines()
    assert (
        line
        == f"qawatch: {short_id}: the reply {outcome}: {' '.join(text.split())} (https://app.qa.tech/chat/{short_id})"
    )


def test_ask_names_a_long_failure_on_one_bounded_line(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. ask --chat, and the reply fails with a long text of many lines 2. exit 1; stderr names
    it on one line of at most about 500 characters of its text; the event keeps it whole."""
    sim = sim_thread.sim
    short_id = sim.create_chat("first", reply_s=0.0)
    long_text = "Step 1 failed:\n" + "\n".join(f"  trace line {i}" for i in range(300))

    def fail_soon() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            messages = sim.conversation_json(short_id)["messages"]
            if messages and messages[0]["role"] == "user" and messages[0]["text"] == "again?":
                sim.add_message(short_id, "assistant", long_text, status="FAILED")
                return
            time.sleep(0.05)

    helper = threading.Thread(target=fail_soon)
    helper.start()
    try:
        code, out, err, _ = run("ask", "--chat", short_id, "again?", "--quiet", env=env, cwd=tmp_path)
    finally:
        helper.join()
    assert code == 1, err
    assert only_event(out)["data"]["message"]["text"] == long_text
    failure = [line for line in err.splitlines() if "the reply FAILED" in line]
    assert len(failure) == 1, err
    assert failure[0].startswith(
        f"qawatch: {short_id}: the reply FAILED: Step 1 failed: trace line 0 trace line 1"
    )
    assert 500 < len(failure[0]) < 600


# ---------------------------------------------------------------------------------------
# fast errors


@pytest.mark.parametrize(
    "command", [("watch", "chat_abc"), ("ask", "--chat", "chat_abc", "hello")], ids=["watch", "ask-chat"]
)
def test_an_unreachable_api_exits_4_within_the_bound(
    env: dict[str, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """1. the base URL is a closed port, --timeout left at 30 min 2. --unreachable-after 2s
    3. exit 4 after about 2 s (not at once, not at the timeout), one line naming the URL and
    the error."""
    base_url = f"http://127.0.0.1:{closed_port()}"
    code, out, err, took = run(
        *command, "--base-url", base_url, "--unreachable-after", "2s", "--quiet", env=env, cwd=tmp_path
    )
    assert code == 4, err
    assert out == ""
    line = err.splitlines()[-1]  # ask says each retry before it
    assert base_url in line
    assert "cannot reach" in line
    assert re.search(r"\(unreachable for [23]s in a row; --unreachable-after 2s\)", line), line
    assert 2.0 <= took < 7.0


def test_connection_failures_shorter_than_the_bound_are_waited_out(
    env: dict[str, str], tmp_path: Path
) -> None:
    """1. nothing listens on the port for 1.5 s 2. watch --unreachable-after 10s 3. then the API
    comes up there with the conversation 4. the reply is reported, exit 0."""
    port = closed_port()
    process = subprocess.Popen(
        [*QAWATCH, "watch", "chat_later", "--unreachable-after", "10s", "--quiet"],
        env={**env, "QAWATCH_API__BASE_URL": f"http://127.0.0.1:{port}"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        assert process.poll() is None, process.communicate()
        config = SimConfig(token=env["QAWATCH_API__TOKEN"], reply_s=0.5)
        with SimulatorThread(config, port=port) as late:
            late.sim.create_chat("q", short_id="chat_later")
            out, err = process.communicate(timeout=CALL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert only_event(out)["data"]["conversation"]["shortId"] == "chat_later"


@pytest.mark.parametrize("flag", ["--unreachable-after", "--progress-every"])
@pytest.mark.parametrize("value", ["5x", "0", "-1s"])
def test_a_bad_duration_exits_2_naming_it(env: dict[str, str], tmp_path: Path, flag: str, value: str) -> None:
    code, _, err, _ = run("watch", "chat_abc", f"{flag}={value}", env=env, cwd=tmp_path)
    assert code == 2
    (line,) = err.splitlines()
    assert flag in line
    assert repr(value) in line


# ---------------------------------------------------------------------------------------
# on a pseudo-terminal

ESC = b"\x1b"
ROWS, COLUMNS = 30, 200


@dataclass
class Terminal:
    """What a pseudo-terminal received: every byte, and the screen after each read."""

    raw: bytes
    screens: list[list[str]]

    @property
    def screen(self) -> list[str]:
        """The lines left on the screen at the end (trailing blanks dropped)."""
        return self.screens[-1] if self.screens else []


def on_terminal(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, Terminal]:
    """Run ``qawatch ARGS`` with stderr on a pseudo-terminal (stdout a pipe, as in
    ``qawatch ask ... > reply.json``); (exit code, stdout, what the terminal got).

    The terminal does not turn "\\n" into "\\r\\n", so each "\\r" in ``raw`` is the program's
    own; the emulated screen does that translation, as a terminal's line discipline would."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    process = subprocess.Popen(
        [*QAWATCH, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    raw, screens = bytearray(), []
    deadline = time.monotonic() + CALL_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last holder of the terminal closed it
                break
            if not chunk:
                break
            raw += chunk
            stream.feed(chunk.replace(b"\n", b"\r\n"))
            screens.append([line.rstrip() for line in screen.display if line.strip()])
        else:
            raise AssertionError(f"qawatch {' '.join(args)} outlived {CALL_TIMEOUT_S}s")
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        assert process.stdout is not None
        out = process.stdout.read().decode()
        process.stdout.close()
        process.wait()
    return process.returncode, out, Terminal(bytes(raw), screens)


def status_rows(terminal: Terminal, short_id: str, *, below: str = "") -> list[tuple[int, str]]:
    """(row, text) of ``short_id``'s status line on each screen it was on (only screens that
    show ``below`` at the top)."""
    return [
        (row, line)
        for screen in terminal.screens
        if screen and screen[0].startswith(below)
        for row, line in enumerate(screen)
        if line.startswith(f"{short_id}  ")
    ]


def test_on_a_terminal_the_status_line_is_redrawn_in_place(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. watch with stderr on a terminal (TERM=xterm-256color) while a reply takes 4 s
    2. the URL is printed once; below it, one status line, always on the same row: waiting,
    then streaming N characters, then finished, with a moving elapsed time 3. colours allowed
    4. the screen ends with the URL and the final state; stdout holds the event alone."""
    short_id = sim_thread.sim.create_chat("slow question")
    code, out, terminal = on_terminal("watch", short_id, env={**env, "TERM": "xterm-256color"}, cwd=tmp_path)
    assert code == 0, terminal.raw
    assert only_event(out)["data"]["message"]["status"] == "COMPLETED"
    url_line = f"qawatch: {short_id}: https://app.qa.tech/chat/{short_id}"
    assert terminal.screen[0] == url_line
    assert re.fullmatch(rf"{short_id}  finished \(COMPLETED\)  \ds", terminal.screen[1]), terminal.screen
    assert len(terminal.screen) == 2
    rows = status_rows(terminal, short_id, below=url_line)
    assert {row for row, _ in rows} == {1}, rows  # under the URL: redrawn in place, never scrolled
    texts = [text for _, text in rows]
    assert any("  waiting for the reply  " in text for text in texts), texts
    assert any(re.search(r"  streaming \d+ characters  ", text) for text in texts), texts
    assert len({text.rsplit("  ", 1)[1] for text in texts}) >= 3  # the elapsed time moves
    assert b"\r\x1b[2K" in terminal.raw  # rich: back to the line's start, erase, draw again
    assert re.search(rb"\x1b\[3\dm", terminal.raw)  # a colour


@pytest.mark.parametrize(
    "plain", [{"NO_COLOR": "1", "TERM": "xterm-256color"}, {"TERM": "dumb"}], ids=["NO_COLOR", "dumb"]
)
def test_no_color_or_a_dumb_terminal_gets_plain_text_redrawn_with_carriage_returns(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, plain: dict[str, str]
) -> None:
    """1. NO_COLOR=1, or TERM=dumb, on a terminal 2. not one escape code 3. the line is still
    redrawn in place, with carriage returns, through waiting, streaming and finished 4. the
    screen ends with the URL and the final state."""
    short_id = sim_thread.sim.create_chat("slow question")
    code, out, terminal = on_terminal("watch", short_id, env={**env, **plain}, cwd=tmp_path)
    assert code == 0, terminal.raw
    assert only_event(out)["data"]["conversation"]["shortId"] == short_id
    assert ESC not in terminal.raw
    assert terminal.raw.count(b"\r") > 4
    assert terminal.screen == [
        f"qawatch: {short_id}: https://app.qa.tech/chat/{short_id}",
        terminal.screen[1],
    ]
    assert terminal.screen[1].startswith(f"{short_id}  finished (COMPLETED)  ")
    rows = status_rows(terminal, short_id, below=terminal.screen[0])
    assert {row for row, _ in rows} == {1}, rows
    texts = [text for _, text in rows]
    assert any("waiting for the reply" in text for text in texts), texts
    assert any("streaming" in text for text in texts), texts


def test_on_a_terminal_several_conversations_and_a_failure(
    env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. watch two conversations on a terminal; one reply fails 2. a status line for each,
    redrawn together below the lines printed once (URLs, the failure with its text and URL)
    3. exit 1, two events on stdout."""
    sim = sim_thread.sim
    good = sim.create_chat("good", reply_s=3.0)
    bad = sim.create_chat("bad", outcome="FAILED", reply_s=2.0)
    code, out, terminal = on_terminal("watch", good, bad, env={**env, "TERM": "xterm-256color"}, cwd=tmp_path)
    assert code == 1, terminal.raw
    types = sorted(json.loads(line)["type"] for line in out.splitlines())
    assert types == ["chat.reply.completed", "chat.reply.failed"]
    screen = terminal.screen
    assert sorted(screen[:2]) == sorted(f"qawatch: {i}: https://app.qa.tech/chat/{i}" for i in (good, bad))
    assert screen[2] == f"qawatch: {bad}: the reply FAILED: {FAILED_TEXT} (https://app.qa.tech/chat/{bad})"
    assert screen[3].startswith(f"{good}  finished (COMPLETED)  ")
    assert screen[4].startswith(f"{bad}  finished (FAILED)  ")
    assert len(screen) == 5
    rows = [row for row, _ in status_rows(terminal, good)]
    assert rows == sorted(rows)  # redrawn in place, pushed down only by the lines printed above it


def test_the_board_never_grows_taller_than_the_terminal() -> None:
    """Review: 35 conversations on a 30-row terminal filled the scrollback on every redraw.
    All of them fit while they leave a row free; else the rows less two, then "... and N more"."""
    assert board_rows(3, 30) == 3
    assert board_rows(29, 30) == 29
    assert board_rows(30, 30) == 28
    assert board_rows(35, 30) == 28
    assert board_rows(5, 2) == 1
