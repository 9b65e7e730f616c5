"""The log pipeline: JSON lines on the given stream, registered secrets scrubbed everywhere."""

from __future__ import annotations

import io
import json
import os

import pytest
import structlog

from daemon import logs


def test_secrets_are_scrubbed_and_structure_is_kept() -> None:
    """1. a secret is registered 2. it is logged inside a string, a list, a dict, an exception
    and a traceback 3. every copy is replaced and lists/dicts stay JSON lists/dicts."""
    stream = io.StringIO()
    saved = structlog.get_config()
    try:
        logs.configure("debug", "json", stream)
        logs.register_secret("tok-5f2a9c1e")
        log = logs.get_logger(conversation="chat_a")
        log.info("one", sinks=["file", "tok-5f2a9c1e"], headers={"Authorization": "Bearer tok-5f2a9c1e"})
        try:
            int("refused tok-5f2a9c1e")
        except ValueError:
            log.exception("two", error=ValueError("tok-5f2a9c1e"))
    finally:
        structlog.configure(**saved)
    text = stream.getvalue()
    assert "tok-5f2a9c1e" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["sinks"] == ["file", "***"]
    assert first["headers"] == {"Authorization": "Bearer ***"}
    assert first["conversation"] == "chat_a"
    assert second["error"] == "***"
    assert "refused ***" in second["exception"]
    assert "Traceback" in second["exception"]


def test_short_values_are_not_treated_as_secrets() -> None:
    """1. a too-short value is registered 2. ordinary words containing it are left alone."""
    stream = io.StringIO()
    saved = structlog.get_config()
    try:
        logs.configure("info", "json", stream)
        logs.register_secret("ab")
        logs.get_logger().info("table and label")
    finally:
        structlog.configure(**saved)
    assert json.loads(stream.getvalue())["event"] == "table and label"


def test_console_logs_are_plain_with_no_color_or_a_dumb_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1. console logs on a real pseudo-terminal 2. coloured by default 3. no escape codes at
    all with NO_COLOR set or TERM=dumb (the renderer's colours followed isatty() alone)."""
    master, slave = os.openpty()
    saved = structlog.get_config()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            assert logs.use_colour(tty, {"TERM": "xterm"})
            assert not logs.use_colour(tty, {"TERM": "xterm", "NO_COLOR": "1"})
            assert not logs.use_colour(tty, {"TERM": "dumb"})
            assert not logs.use_colour(io.StringIO(), {})
            for env, coloured in (({"TERM": "xterm"}, True), ({"TERM": "xterm", "NO_COLOR": "1"}, False)):
                monkeypatch.delenv("NO_COLOR", raising=False)
                for name, value in env.items():
                    monkeypatch.setenv(name, value)
                logs.configure("info", "console", tty)
                logs.get_logger().warning("hello", conversation="chat_a")
                tty.flush()
                text = os.read(master, 65536).decode()
                assert "hello" in text
                assert ("\x1b[" in text) is coloured, text
    finally:
        structlog.configure(**saved)
        os.close(master)
