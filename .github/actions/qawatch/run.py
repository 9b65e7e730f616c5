#!/usr/bin/env python3
"""The qawatch GitHub Action's main step (``action.yml`` at the repository root runs it).

Runs ``qawatch ask`` or ``qawatch watch`` as the inputs say, copies the event lines it prints to
a file under ``$RUNNER_TEMP`` (and to the log), sets the step's outputs, and exits with qawatch's
exit code: the step, and so the job, fails when a reply fails, is cancelled or times out.

Inputs come from the environment only (``action.yml`` maps each input to one variable;
nothing is interpolated into a script):

- ``INPUT_MESSAGE``: ask this (exactly one of ``INPUT_MESSAGE`` and ``INPUT_CONVERSATIONS``)
- ``INPUT_CHAT``: with a message, send it as a follow-up in this conversation
- ``INPUT_CONVERSATIONS``: watch these ids (separated by spaces, commas or new lines)
- ``INPUT_TIMEOUT``: ``90``, ``90s``, ``15m``, ``2h`` (default 30m)
- ``INPUT_BASE_URL``: the API's base URL (default: qawatch's)
- ``INPUT_SUMMARY``: ``true`` adds the outcome and the reply to the job summary
- ``QAWATCH_API__TOKEN``: the token, read by qawatch itself (never on a command line)
- ``ACTION_QAWATCH``: the qawatch executable (default: the one beside this Python, else PATH)

Outputs (``$GITHUB_OUTPUT``): ``status`` (completed | failed | cancelled | timeout | error),
``exit-code``, ``conversation-id`` and ``conversation-url`` (one per line with several
conversations), ``reply-file`` (the reply's text; empty when there is no reply) and
``events-file`` (the event JSON lines).

Standard library only, Python 3.11+.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

USAGE = 2
#: qawatch's exit codes and the status each means (1 is refined by the events: failed or cancelled)
STATUS_BY_CODE = {0: "completed", 1: "failed", 3: "timeout"}
EXIT_MEANING = {
    1: "qawatch failed",
    2: "bad usage, configuration or input",
    4: "the API refused the request (token, conversation id) or could not be reached",
}
REPLY_TYPES = ("chat.reply.completed", "chat.reply.failed", "chat.reply.cancelled")
SUMMARY_TEXT_LIMIT = 16_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """Inputs that make no sense: exit 2 with status ``error``."""


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def escape_data(text: str) -> str:
    """A workflow command's message, escaped as the runner expects (one line, ``%`` literal)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def error(message: str) -> None:
    """An error annotation on GitHub, a plain line on stderr elsewhere."""
    if in_actions():
        print(f"::error title=qawatch::{escape_data(message)}", flush=True)
    else:
        print(f"qawatch action: {message}", file=sys.stderr, flush=True)


def parse_duration(text: str) -> str:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` as seconds for ``--timeout`` (a whole number when
    it is one, so that any qawatch version accepts it)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"timeout {text!r} is not a duration like 90, 90s, 15m or 2h")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2).lower()]
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"timeout {text!r} must be more than 0")
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:.3f}"


def qawatch_executable() -> str:
    configured = os.environ.get("ACTION_QAWATCH", "").strip()
    if configured:
        return configured
    beside = Path(sys.executable).with_name("qawatch")
    if beside.is_file():
        return str(beside)
    found = shutil.which("qawatch")
    if found is None:
        raise UsageError("qawatch is not installed (no ACTION_QAWATCH, none beside Python or on PATH)")
    return found


def command_line(env: dict[str, str]) -> list[str]:
    """The qawatch command the inputs ask for (ask or watch), validated."""
    message = env.get("INPUT_MESSAGE", "")
    chat = env.get("INPUT_CHAT", "").strip()
    ids = [part for part in re.split(r"[\s,]+", env.get("INPUT_CONVERSATIONS", "")) if part]
    timeout = parse_duration(env.get("INPUT_TIMEOUT", "") or "30m")
    if message.strip() and ids:
        raise UsageError("give either message (ask) or conversations (watch), not both")
    if ids:
        if chat:
            raise UsageError("chat is for a follow-up message; to wait on a conversation use conversations")
        return [qawatch_executable(), "watch", "--timeout", timeout, "--", *ids]
    if not message.strip():
        raise UsageError("give a message to ask, or conversations to watch")
    follow_up = ["--chat", chat] if chat else []
    return [qawatch_executable(), "ask", "--timeout", timeout, *follow_up, "--", message]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if "QAWATCH_API__TOKEN" in env and not env["QAWATCH_API__TOKEN"].strip():
        raise UsageError(
            "the token input is empty: is the secret set, and passed to this workflow "
            "(secrets are not passed to workflows run from forks)?"
        )
    base_url = env.get("INPUT_BASE_URL", "").strip()
    if base_url:
        env["QAWATCH_API__BASE_URL"] = base_url
    return env


#: what ``ask`` says on stderr when it has started a new chat
STARTED = re.compile(r"^qawatch: started (chat\S+)(?: (\S+))?$")


def _tee_stderr(stream: Any, started: dict[str, str]) -> None:
    """Copy qawatch's stderr to ours line by line; note the chat ``ask`` started (its id and
    URL), so that the outputs name it even when no reply came."""
    for raw in stream:
        sys.stderr.buffer.write(raw)
        sys.stderr.buffer.flush()
        match = STARTED.match(raw.decode("utf-8", "replace").rstrip("\n"))
        if match and "id" not in started:
            started["id"], started["url"] = match.group(1), match.group(2) or ""


def run_qawatch(argv: list[str], env: dict[str, str], events_file: Path, started: dict[str, str]) -> int:
    """Run qawatch: its stdout (the event lines) goes to ``events_file`` and to our stdout, its
    stderr (progress, failures) to the log, through :func:`_tee_stderr` (filling ``started``).
    SIGINT/SIGTERM are passed on, so that a cancelled job stops the wait. Returns its exit code
    (128 + N when signal N killed it)."""
    resume = secrets.token_hex(16)
    if in_actions():
        # what the reply says (echoed by qawatch) must not run as workflow commands
        print(f"::stop-commands::{resume}", flush=True)
    try:
        with events_file.open("wb") as sink:
            # S603: argv is qawatch and its arguments, as a list: no shell sees the inputs
            process = subprocess.Popen(  # noqa: S603
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            tee = threading.Thread(target=_tee_stderr, args=(process.stderr, started), daemon=True)
            tee.start()

            def forward(signum: int, _frame: FrameType | None) -> None:
                if process.poll() is None:
                    process.send_signal(signum)

            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, forward)
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
            code = process.wait()
            tee.join(timeout=10)
    finally:
        if in_actions():
            print(f"::{resume}::", flush=True)
    return 128 - code if code < 0 else code


def read_events(events_file: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in events_file.read_bytes().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not an event line (a future text output, say): the file keeps it
        if isinstance(event, dict):
            events.append(event)
    return events


def status_of(code: int, events: list[dict[str, Any]]) -> str:
    status = STATUS_BY_CODE.get(code, "error")
    if code == 1:
        types = {event.get("type") for event in events}
        if "chat.reply.failed" in types:
            return "failed"
        if "chat.reply.cancelled" in types:
            return "cancelled"
        return "error"  # exit 1 without a failed reply: qawatch itself failed
    return status


def _field(event: dict[str, Any], *path: str) -> str:
    value: Any = event
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def reply_text(replies: list[dict[str, Any]]) -> str:
    """The reply's text; with several conversations, each under a ``==> id: STATUS <==`` line."""
    if len(replies) == 1:
        return _field(replies[0], "data", "message", "text")
    return "\n".join(
        f"==> {_field(r, 'data', 'conversation', 'shortId')}: {_field(r, 'data', 'message', 'status')} <==\n"
        f"{_field(r, 'data', 'message', 'text')}\n"
        for r in replies
    )


def per_conversation(replies: list[dict[str, Any]], key: str) -> str:
    """``data.conversation[key]`` of the replies, one line each, without repeats."""
    values = [_field(reply, "data", "conversation", key) for reply in replies]
    return "\n".join(value for value in dict.fromkeys(values) if value)


def set_outputs(outputs: dict[str, str]) -> None:
    path = os.environ.get("GITHUB_OUTPUT")
    if not path:
        for name, value in outputs.items():
            print(f"qawatch action: output {name}={value!r}", file=sys.stderr)
        return
    with open(path, "a", encoding="utf-8") as out:
        for name, value in outputs.items():
            delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
            out.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def fence(text: str) -> str:
    """``text`` in a code fence longer than any run of backticks in it (shown, never rendered)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text}\n{ticks}"


def write_summary(status: str, code: int, replies: list[dict[str, Any]], timeout: str) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path or os.environ.get("INPUT_SUMMARY", "true").strip().lower() != "true":
        return
    lines = [f"### qawatch: {status}", ""]
    for reply in replies:
        short_id = _field(reply, "data", "conversation", "shortId")
        url = _field(reply, "data", "conversation", "url")
        link = f"[{short_id}]({url})" if url.startswith("https://") else f"`{short_id}`"
        lines.append(f"- {link}: {_field(reply, 'data', 'message', 'status')}")
    if status == "timeout":
        lines.append(f"- no reply within {timeout} s")
    elif not replies:
        lines.append(f"- qawatch exited {code}: see the step's log")
    for reply in replies:
        text = _field(reply, "data", "message", "text")
        if len(text) > SUMMARY_TEXT_LIMIT:
            text = text[:SUMMARY_TEXT_LIMIT] + "\n[... cut; the whole reply is in the reply-file output]"
        lines += ["", "<details><summary>Reply</summary>", "", fence(text), "", "</details>"]
    with open(path, "a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n\n")


def annotate(status: str, replies: list[dict[str, Any]], timeout: str, code: int) -> None:
    if status in {"failed", "cancelled"}:
        for reply in replies:
            if reply.get("type") != "chat.reply.completed":
                short_id = _field(reply, "data", "conversation", "shortId")
                state = _field(reply, "data", "message", "status")
                url = _field(reply, "data", "conversation", "url")
                error(f"the reply in {short_id} ended {state}: {url}")
    elif status == "timeout":
        error(f"no reply within the timeout ({timeout} s); the step's log names the conversation")
    elif status == "error":
        error(f"{EXIT_MEANING.get(code, 'qawatch failed')} (exit {code}): see the step's log")


def chat_of(argv: list[str]) -> str:
    """The ``--chat`` of an ``ask`` command line, if any."""
    return argv[argv.index("--chat") + 1] if "--chat" in argv else ""


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="qawatch-", dir=os.environ.get("RUNNER_TEMP") or None))
    events_file = workdir / "events.ndjson"
    events_file.touch()
    outputs = {"status": "error", "exit-code": str(USAGE), "conversation-id": "", "conversation-url": ""}
    outputs |= {"reply-file": "", "events-file": str(events_file)}
    try:
        argv = command_line(dict(os.environ))
        env = child_env()
    except UsageError as exc:
        error(str(exc))
        set_outputs(outputs)
        return USAGE
    timeout = argv[argv.index("--timeout") + 1]
    started: dict[str, str] = {}
    try:
        code = run_qawatch(argv, env, events_file, started)
    except OSError as exc:
        error(f"cannot run {argv[0]}: {exc.strerror or exc}")
        set_outputs(outputs)
        return USAGE
    replies = [event for event in read_events(events_file) if event.get("type") in REPLY_TYPES]
    status = status_of(code, replies)
    outputs["status"], outputs["exit-code"] = status, str(code)
    # without a reply (a timeout, an error): the ids it waited on, or the chat ask started
    waited = argv[argv.index("--") + 1 :] if argv[1] == "watch" else [started.get("id") or chat_of(argv)]
    outputs["conversation-id"] = per_conversation(replies, "shortId") or "\n".join(i for i in waited if i)
    outputs["conversation-url"] = per_conversation(replies, "url") or started.get("url", "")
    if replies:
        reply_file = workdir / "reply.txt"
        reply_file.write_text(reply_text(replies), encoding="utf-8")
        outputs["reply-file"] = str(reply_file)
    set_outputs(outputs)
    write_summary(status, code, replies, timeout)
    annotate(status, replies, timeout, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
