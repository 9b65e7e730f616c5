"""The `qawatch` command line as users run it: real subprocesses against a simulator thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import CALL_TIMEOUT_S, QAWATCH, closed_port, one_line_error, qawatch_async, until
from webhook_receiver import Answer, Receiver

from daemon import __version__
from daemon.simulator import Fault, SimulatorThread


def qawatch(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = CALL_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QAWATCH, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*QAWATCH, *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reap(process: subprocess.Popen[str]) -> None:
    """Make sure ``process`` is gone and its pipes are closed (after a failure, or kill -9)."""
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=5)


def stop(
    process: subprocess.Popen[str], timeout: float = 5.0, signum: int = signal.SIGTERM
) -> tuple[str, str, float]:
    """SIGTERM (or ``signum``); the output and how long the process took to exit."""
    started = time.monotonic()
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        reap(process)
    return out, err, time.monotonic() - started


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of the complete lines of ``text`` (a line still being written is skipped)."""
    complete = text.split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def gets(sim_thread: SimulatorThread, short_id: str) -> int:
    return sum(1 for r in sim_thread.sim.requests_for(short_id) if r.method == "GET")


@pytest.fixture
def token(sim_thread: SimulatorThread) -> str:
    return sim_thread.sim.config.token


@pytest.fixture
def cli_env(subprocess_env: dict[str, str], sim_thread: SimulatorThread, token: str) -> dict[str, str]:
    """Settings for fast runs against the simulator, through the environment."""
    return {
        **subprocess_env,
        "QAWATCH_API__TOKEN": token,
        "QAWATCH_API__BASE_URL": sim_thread.base_url,
        "QAWATCH_API__TIMEOUT_S": "2",
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
        "QAWATCH_POLL__IDLE_INTERVAL_S": "0.2",
        "QAWATCH_POLL__JITTER": "0",
        "QAWATCH_POLL__ERROR_BACKOFF_MAX_S": "0.2",
        "QAWATCH_LOG__FORMAT": "json",
    }


# ---------------------------------------------------------------------------------------
# --version, --help, usage


def test_version(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. qawatch --version 2. prints the version, exit 0."""
    result = qawatch("--version", env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"qawatch {__version__}"


def test_help_lists_the_commands(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. qawatch --help 2. exit 0 and every command of the design is listed."""
    result = qawatch("--help", env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "watch", "ask", "check-config", "simulate", "demo"):
        assert re.search(rf"\b{command}\b", result.stdout), command


BAD_USAGE = {
    "unknown-command": ("frobnicate",),
    "watch-without-id": ("watch",),
    "zero-timeout": ("watch", "chat_a", "--timeout", "0"),
    "nan-timeout": ("watch", "chat_a", "--timeout", "nan"),
    "inf-timeout": ("ask", "hello", "--timeout", "inf"),
    "empty-message": ("ask", "   "),
    "simulate-port-99999": ("simulate", "--port", "99999"),
    "simulate-port-negative": ("simulate", "--port", "-1"),
    "simulate-negative-chats": ("simulate", "--chats", "-3"),
    "simulate-nan-reply-seconds": ("simulate", "--reply-seconds", "nan"),
}


@pytest.mark.parametrize("args", BAD_USAGE.values(), ids=BAD_USAGE.keys())
def test_bad_usage_exits_2(cli_env: dict[str, str], tmp_path: Path, args: tuple[str, ...]) -> None:
    """1. a command line that makes no sense 2. exit 2 with one line on stderr, no traceback."""
    result = qawatch(*args, env=cli_env, cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result.stderr)
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------
# check-config


def test_check_config_prints_effective_settings_redacted(
    subprocess_env: dict[str, str], tmp_path: Path, token: str
) -> None:
    """1. YAML, env and a flag each set some keys; tokens in env and YAML 2. check-config exits 0
    3. stdout is YAML of the merged settings with both tokens shown as '***'."""
    config = tmp_path / "qawatch.yaml"
    config.write_text(
        "api:\n  base_url: http://yaml.test\n  message_limit: 9\n"
        "poll:\n  active_interval_s: 0.5\n"
        f"control:\n  token: {token}-control\n"
        "watch:\n  ids: [chat_abc]\n",
        encoding="utf-8",
    )
    env = {**subprocess_env, "QAWATCH_API__TOKEN": token, "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.25"}
    result = qawatch("check-config", "--config", str(config), "--log-level", "debug", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout
    assert token not in result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["api"]["token"] == "***"
    assert shown["control"]["token"] == "***"
    assert shown["api"]["base_url"] == "http://yaml.test"
    assert shown["api"]["message_limit"] == 9
    assert shown["poll"]["active_interval_s"] == 0.25  # env beats YAML
    assert shown["watch"]["ids"] == ["chat_abc"]
    assert shown["log"]["level"] == "debug"  # the flag

    flagged = qawatch(
        "check-config", "--config", str(config), "--base-url", "http://flag.test", env=env, cwd=tmp_path
    )
    assert yaml.safe_load(flagged.stdout)["api"]["base_url"] == "http://flag.test"


def test_check_config_masks_credentials_in_urls(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. a webhook url with a user:password and a query key 2. check-config exits 0 and shows it
    as user:***@ and key=*** 3. neither the password nor the key is printed 4. the same
    credentials in api.base_url (which they cannot work in, next to the token) are a config
    error naming api.base_url, without the password either."""
    url = "https://ci:pw-hunter2-secret@hooks.example.com/qa?team=qa&key=qk-0451-secret"
    config = tmp_path / "qawatch.yaml"
    config.write_text(yaml.safe_dump({"sinks": [{"type": "webhook", "url": url}]}), encoding="utf-8")
    env = {**subprocess_env, "QAWATCH_API__TOKEN": "sim-token"}
    result = qawatch("check-config", "--config", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["sinks"][0]["url"] == "https://ci:***@hooks.example.com/qa?team=***&key=***"
    for secret in ("pw-hunter2-secret", "qk-0451-secret"):
        assert secret not in result.stdout + result.stderr

    env["QAWATCH_API__BASE_URL"] = "https://ci:pw-hunter2-secret@api.qa.tech"
    result = qawatch("check-config", "--config", str(config), env=env, cwd=tmp_path)
    assert result.returncode == 2
    message = one_line_error(result.stderr)
    assert "api.base_url:" in message
    assert "https://ci:***@api.qa.tech" in message
    assert "pw-hunter2-secret" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "headers", "key"),
    [
        ("https://ci:pw-hunter2-secret@hooks.example.com:0/qa", {}, "sinks.0.url"),
        ("https://ci:pw-hunter2-secret@hooks.example.com/qa", {"Authorization": "Bearer x"}, "sinks.0"),
    ],
    ids=["bad-port", "with-authorization-header"],
)
def test_bad_webhook_url_with_credentials_is_named_without_them(
    subprocess_env: dict[str, str], tmp_path: Path, url: str, headers: dict[str, str], key: str
) -> None:
    """1. a webhook url with credentials that is wrong (port 0) or that cannot be combined with
    the Authorization header also configured 2. check-config exits 2 3. one line names the key
    4. the password is not in it."""
    hook = {"type": "webhook", "url": url, "headers": headers}
    (tmp_path / "qawatch.yaml").write_text(yaml.safe_dump({"sinks": [hook]}), encoding="utf-8")
    env = {**subprocess_env, "QAWATCH_API__TOKEN": "sim-token"}
    result = qawatch("check-config", "--config", "qawatch.yaml", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert one_line_error(result.stderr).startswith(f"qawatch: config error: {key}: ")
    assert "pw-hunter2-secret" not in result.stderr


@dataclass(frozen=True)
class BadConfig:
    """One bad setting given through YAML, env or a flag, and the key the error must name."""

    name: str
    yaml_text: str | None
    env: dict[str, str]
    args: tuple[str, ...]
    key: str


CHECK_CONFIG_BAD = [
    BadConfig("yaml-unknown-key", "poll:\n  speed: 3\n", {}, (), "poll.speed"),
    BadConfig("yaml-jitter", "poll:\n  jitter: 1\n", {}, (), "poll.jitter"),
    BadConfig("yaml-bad-id", "watch:\n  ids: ['chat_a/b']\n", {}, (), "watch.ids.0"),
    BadConfig("yaml-syntax", "api: [1, 2\n", {}, (), "qawatch.yaml"),
    BadConfig("yaml-not-mapping", "- chat_a\n", {}, (), "qawatch.yaml"),
    BadConfig("yaml-idle-below-active", "poll:\n  idle_interval_s: 0.1\n", {}, (), "poll.idle_interval_s"),
    BadConfig("yaml-file-sink-no-path", "sinks:\n  - type: file\n", {}, (), "sinks.0.path"),
    BadConfig(
        "yaml-file-sink-no-folder", "sinks:\n  - {type: file, path: nope/r.ndjson}\n", {}, (), "sinks.0.path"
    ),
    BadConfig("yaml-state-no-folder", "state:\n  path: nope/state.db\n", {}, (), "state.path"),
    BadConfig("yaml-token-and-file", "api:\n  token_file: /nonexistent\n", {}, (), "api.token"),
    BadConfig(
        "env-zero-interval", None, {"QAWATCH_POLL__ACTIVE_INTERVAL_S": "0"}, (), "poll.active_interval_s"
    ),
    BadConfig("env-unknown-nested", None, {"QAWATCH_API__TOKN": "x"}, (), "QAWATCH_API__TOKN"),
    BadConfig("env-unknown-top", None, {"QAWATCH_FOO": "1"}, (), "QAWATCH_FOO"),
    BadConfig("env-bad-base-url", None, {"QAWATCH_API__BASE_URL": "api.qa.tech"}, (), "api.base_url"),
    BadConfig("env-bad-ids", None, {"QAWATCH_WATCH__IDS": "chat_ok,chat_"}, (), "watch.ids.1"),
    BadConfig(
        "env-base-url-port-99999",
        None,
        {"QAWATCH_API__BASE_URL": "http://127.0.0.1:99999"},
        (),
        "api.base_url",
    ),
    BadConfig(
        "env-base-url-port-0", None, {"QAWATCH_API__BASE_URL": "http://127.0.0.1:0"}, (), "api.base_url"
    ),
    BadConfig("flag-base-url-no-host", None, {}, ("--base-url", "http://:8080"), "api.base_url"),
    # review: urlsplit takes these, the HTTP client's parser does not (was exit 1 at start-up)
    BadConfig("env-base-url-backslash", None, {"QAWATCH_API__BASE_URL": "https://h\\x"}, (), "api.base_url"),
    BadConfig(
        "yaml-webhook-text-after-ipv6",
        "sinks:\n  - {type: webhook, url: 'https://[::1]x/qa'}\n",
        {},
        (),
        "sinks.0.url",
    ),
    BadConfig(
        "yaml-webhook-port-70000",
        "sinks:\n  - {type: webhook, url: 'https://hooks.example.com:70000/qa'}\n",
        {},
        (),
        "sinks.0.url",
    ),
    BadConfig(
        "yaml-webhook-no-host", "sinks:\n  - {type: webhook, url: 'https://:443/qa'}\n", {}, (), "sinks.0.url"
    ),
    BadConfig(
        "yaml-two-webhooks-to-one-url",
        "sinks:\n  - {type: webhook, url: 'https://a.example.com/qa'}\n"
        "  - {type: webhook, url: 'https://a.example.com/qa'}\n",
        {},
        (),
        "sinks",
    ),
    BadConfig("flag-missing-config", None, {}, ("--config", "missing.yaml"), "--config"),
    BadConfig("env-missing-config", None, {"QAWATCH_CONFIG": "missing.yaml"}, (), "missing.yaml"),
    BadConfig("binary-config", "\udcff\udcfe", {}, (), "--config"),
]


@pytest.mark.parametrize("case", CHECK_CONFIG_BAD, ids=[c.name for c in CHECK_CONFIG_BAD])
def test_check_config_bad_config_exits_2_naming_the_key(
    subprocess_env: dict[str, str], tmp_path: Path, token: str, case: BadConfig
) -> None:
    """1. one bad setting (YAML, env or flag) 2. check-config exits 2
    3. one stderr line names the key, no traceback, nothing on stdout, no token."""
    args = ["check-config", *case.args]
    if case.yaml_text is not None:
        # surrogateescape: the "binary-config" case writes bytes that are not UTF-8
        (tmp_path / "qawatch.yaml").write_bytes(case.yaml_text.encode("utf-8", "surrogateescape"))
        args += ["--config", "qawatch.yaml"]
    env = {**subprocess_env, "QAWATCH_API__TOKEN": token, **case.env}
    result = qawatch(*args, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    message = one_line_error(result.stderr)
    assert re.search(rf"(?<![\w.]){re.escape(case.key)}(?![\w])", message), message
    assert result.stdout == ""
    assert token not in result.stderr


def test_nul_in_a_path_setting_exits_2_naming_the_key(cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. a YAML file whose state.path holds a NUL byte 2. check-config and run both exit 2
    3. one line names state.path (run used to fail with an internal error)."""
    (tmp_path / "f.yaml").write_text('state:\n  path: "state\\0.db"\n', encoding="utf-8")
    for command in ("check-config", "run"):
        result = qawatch(command, "--config", "f.yaml", env=cli_env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert one_line_error(result.stderr).startswith("qawatch: config error: state.path: "), result.stderr


@pytest.mark.parametrize(
    ("text", "key"), [("1: 2\n", "1"), ("true: 1\napi: {}\n", "true")], ids=["int", "bool"]
)
def test_check_config_non_string_top_level_key_exits_2_naming_it(
    cli_env: dict[str, str], tmp_path: Path, text: str, key: str
) -> None:
    """1. a YAML file whose top-level key is not a name (`1: 2`, `true: 1`) 2. check-config and
    run exit 2 3. one line names the key as written, no traceback."""
    (tmp_path / "f.yaml").write_text(text, encoding="utf-8")
    for command in ("check-config", "run"):
        result = qawatch(command, "--config", "f.yaml", env=cli_env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert one_line_error(result.stderr).startswith(f"qawatch: config error: {key}: unknown key")


def test_check_config_no_token_validates_the_rest(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. a configuration without a token, as under systemd (which provides it at start through
    $CREDENTIALS_DIRECTORY) 2. check-config exits 2 for the missing token 3. check-config
    --no-token exits 0 and prints the settings 4. with --no-token a bad key is still exit 2."""
    config = tmp_path / "qawatch.yaml"
    config.write_text("watch:\n  ids: [chat_abc]\n", encoding="utf-8")
    result = qawatch("check-config", "--config", str(config), env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 2
    assert "api.token:" in one_line_error(result.stderr)

    result = qawatch("check-config", "--no-token", "--config", str(config), env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["watch"]["ids"] == ["chat_abc"]
    assert shown["api"]["token"] is None

    config.write_text("watch:\n  ids: [chat_abc]\n  idz: []\n", encoding="utf-8")
    result = qawatch("check-config", "--no-token", "--config", str(config), env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 2
    assert "watch.idz" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("token_file", "key"),
    [(None, "api.token"), ("", "api.token_file"), ("missing", "api.token_file")],
    ids=["no-token", "empty-token-file", "missing-token-file"],
)
def test_missing_token_exits_2(
    subprocess_env: dict[str, str], tmp_path: Path, token_file: str | None, key: str
) -> None:
    """1. no usable token (none, an empty file, a missing file) 2. check-config and watch exit 2
    3. one line naming the key."""
    env = dict(subprocess_env)
    if token_file is not None:
        path = tmp_path / "token"
        if token_file != "missing":
            path.write_text(token_file, encoding="utf-8")
        env["QAWATCH_API__TOKEN_FILE"] = str(path)
    for args in (("check-config",), ("watch", "chat_abc", "--timeout", "1")):
        result = qawatch(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, args
        assert key + ":" in one_line_error(result.stderr)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"# watched chats\nchat_ok\nnot an id\n", "line 3"), (b"chat_ok\n\xff\xfe\n", "UTF-8")],
    ids=["bad-id", "not-utf8"],
)
def test_bad_watch_file_exits_2_naming_file_and_line(
    cli_env: dict[str, str], tmp_path: Path, content: bytes, fragment: str
) -> None:
    """1. watch.file whose third line is not an id (or that is not text) 2. check-config and run
    exit 2 3. one line names watch.file, the file and the line; run did not start (no state file)."""
    watch_file = tmp_path / "ids.txt"
    watch_file.write_bytes(content)
    env = {**cli_env, "QAWATCH_WATCH__FILE": str(watch_file), "QAWATCH_STATE__PATH": "state.db"}
    for command in ("check-config", "run"):
        result = qawatch(command, env=env, cwd=tmp_path)
        assert result.returncode == 2, command
        message = one_line_error(result.stderr)
        assert "watch.file" in message
        assert str(watch_file) in message
        assert fragment in message
    assert not (tmp_path / "state.db").exists()


def test_watch_with_a_port_out_of_range_exits_2_at_once(cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. watch with api.base_url on port 99999 (or 0) 2. exit 2 at once, not 3 after a "timeout"
    3. one line naming api.base_url."""
    for base_url in ("http://127.0.0.1:99999", "http://127.0.0.1:0"):
        env = {**cli_env, "QAWATCH_API__BASE_URL": base_url}
        result = qawatch("watch", "chat_abc", "--timeout", "30", env=env, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "api.base_url:" in one_line_error(result.stderr)
        assert result.stdout == ""


#: (where the token comes from, the token's text with {token} for the real one)
BAD_TOKENS = {
    "second-line-in-file": ("file", "{token}\n# rotated 2026-11-01\n"),
    "space-in-file": ("file", "{token} extra"),
    "tab-in-env": ("env", "{token}\tx"),
}


@pytest.mark.parametrize("case", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_token_with_whitespace_inside_exits_2_without_echoing_it(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, token: str, case: tuple[str, str]
) -> None:
    """1. a token file with a second line (a comment left by whoever rotated it), or a token with
    a space or tab inside 2. watch and check-config exit 2, nothing is sent to the API 3. one line
    names the key (api.token_file / api.token) and does not show the token."""
    where, content = case
    value = content.format(token=token)
    env = dict(cli_env)
    del env["QAWATCH_API__TOKEN"]
    if where == "file":
        (tmp_path / "token").write_text(value, encoding="utf-8")
        env["QAWATCH_API__TOKEN_FILE"] = str(tmp_path / "token")
        key = "api.token_file:"
    else:
        env["QAWATCH_API__TOKEN"] = value
        key = "api.token:"
    for args in (("watch", "chat_abc", "--timeout", "30"), ("check-config",)):
        result = qawatch(*args, env=env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert key in one_line_error(result.stderr)
        assert token not in result.stderr + result.stdout
    assert sim_thread.sim.requests == []


#: runs ``qawatch`` with the detector replaced by one that raises for the id in $BROKEN_ID: a bug
BROKEN_DETECTOR = r"""
import os, sys
import daemon.oneshot
real_detect = daemon.oneshot.detect
def detect(state, conversation, **kwargs):
    if conversation.short_id == os.environ["BROKEN_ID"]:
        raise RuntimeError("detector broke\non " + os.environ["QAWATCH_API__TOKEN"])
    return real_detect(state, conversation, **kwargs)
daemon.oneshot.detect = detect
from daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_in_watch_is_an_internal_error_not_a_timeout(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, token: str
) -> None:
    """1. watch two ids, one with a slow reply; handling the other one raises (a bug)
    2. watch does not wait for the timeout and does not call it one: exit 1 within seconds
    3. stderr is one line "qawatch: internal error: RuntimeError: ..." with no traceback
    and the token in the message scrubbed."""
    sim = sim_thread.sim
    broken, slow = sim.create_chat("q", reply_s=0.0), sim.create_chat("slow", reply_s=60)
    env = {**cli_env, "BROKEN_ID": broken}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_DETECTOR, "watch", slow, broken, "--timeout", "30"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert time.monotonic() - started < 10
    assert result.returncode == 1, result.stderr
    line = one_line_error(result.stderr)
    assert line == "qawatch: internal error: RuntimeError: detector broke on ***"
    assert token not in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------
# watch: exit codes


def test_watch_completed_prints_one_event_and_exits_0(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a chat whose reply is still coming 2. watch waits for it 3. exit 0, one JSON event
    line on stdout and nothing else."""
    short_id = sim_thread.sim.create_chat("Does checkout work?", reply="It does.")
    result = qawatch("watch", short_id, env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    (event,) = lines(result.stdout)
    assert event["type"] == "chat.reply.completed"
    assert event["id"].startswith("evt_")
    assert "." not in event["id"]
    assert event["data"]["conversation"]["shortId"] == short_id
    assert event["data"]["message"]["status"] == "COMPLETED"
    assert event["data"]["message"]["text"] == "It does."
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("outcome", "event_type"),
    [("FAILED", "chat.reply.failed"), ("CANCELLED", "chat.reply.cancelled")],
)
def test_watch_failed_or_cancelled_exits_1(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, outcome: str, event_type: str
) -> None:
    """1. a reply that ends FAILED or CANCELLED 2. watch prints its event 3. exit 1."""
    short_id = sim_thread.sim.create_chat("q", outcome=outcome)
    result = qawatch("watch", short_id, env=cli_env, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    (event,) = lines(result.stdout)
    assert event["type"] == event_type
    assert event["data"]["message"]["status"] == outcome


def test_watch_timeout_exits_3_naming_the_id(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a reply that takes a minute 2. watch --timeout 0.5 3. exit 3 soon after, the id on stderr."""
    short_id = sim_thread.sim.create_chat("slow", reply_s=60)
    started = time.monotonic()
    result = qawatch("watch", short_id, "--timeout", "0.5", env=cli_env, cwd=tmp_path)
    assert result.returncode == 3
    assert time.monotonic() - started < 8
    assert result.stdout == ""
    assert short_id in one_line_error(result.stderr)


def test_watch_not_found_exits_4(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a conversation the API does not know 2. exit 4 at once (one GET), the id on stderr."""
    result = qawatch("watch", "chat_gone", env=cli_env, cwd=tmp_path)
    assert result.returncode == 4
    assert "chat_gone" in one_line_error(result.stderr)
    assert "404" in result.stderr
    assert gets(sim_thread, "chat_gone") == 1


def test_watch_wrong_token_exits_4(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a token the API refuses (401) 2. exit 4 at once; the refused token is not printed."""
    short_id = sim_thread.sim.create_chat("q")
    wrong = "qwt-WRONG-TOKEN-55aa77"
    env = {**cli_env, "QAWATCH_API__TOKEN": wrong}
    result = qawatch("watch", short_id, "--timeout", "10", "--log-level", "debug", env=env, cwd=tmp_path)
    assert result.returncode == 4
    assert "401" in one_line_error(result.stderr)
    assert wrong not in result.stderr + result.stdout
    assert gets(sim_thread, short_id) == 1


def test_watch_unreachable_exits_4(cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. the base URL is a closed port 2. watch --timeout 1 3. exit 4 (not 3), naming the URL."""
    base_url = f"http://127.0.0.1:{closed_port()}"
    env = {**cli_env, "QAWATCH_API__BASE_URL": base_url}
    result = qawatch("watch", "chat_abc", "--timeout", "1", env=env, cwd=tmp_path)
    assert result.returncode == 4
    message = one_line_error(result.stderr)
    assert "chat_abc" in message
    assert base_url in message


@pytest.mark.parametrize("bad_id", ["bad id", "chat_", "chat_a/b", "abc"])
def test_watch_bad_id_exits_2(cli_env: dict[str, str], tmp_path: Path, bad_id: str) -> None:
    """1. watch with an id that is not a QA.tech short id 2. exit 2 naming it, nothing fetched."""
    result = qawatch("watch", "chat_fine", bad_id, env=cli_env, cwd=tmp_path)
    assert result.returncode == 2
    assert repr(bad_id) in one_line_error(result.stderr)
    assert result.stdout == ""


def test_watch_several_ids_most_severe_code(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. completed + 404 -> 4 2. failed + timeout -> 3 3. completed + failed -> 1
    4. one stdout line per finished conversation, each conversation once."""
    sim = sim_thread.sim
    done = sim.create_chat("a")
    failed = sim.create_chat("b", outcome="FAILED")
    slow = sim.create_chat("c", reply_s=60)

    result = qawatch("watch", done, "chat_gone", env=cli_env, cwd=tmp_path)
    assert result.returncode == 4
    assert [e["data"]["conversation"]["shortId"] for e in lines(result.stdout)] == [done]
    assert "chat_gone" in one_line_error(result.stderr)

    result = qawatch("watch", failed, slow, "--timeout", "1", env=cli_env, cwd=tmp_path)
    assert result.returncode == 3
    assert [e["data"]["conversation"]["shortId"] for e in lines(result.stdout)] == [failed]
    # the failed reply is named on stderr as it ends, the unfinished one at the timeout
    failure, message = result.stderr.splitlines()
    assert failure.startswith(f"qawatch: {failed}: the reply FAILED: ")
    assert slow in message
    assert failed not in message

    result = qawatch("watch", done, failed, env=cli_env, cwd=tmp_path)
    assert result.returncode == 1
    events = {e["data"]["conversation"]["shortId"]: e["type"] for e in lines(result.stdout)}
    assert events == {done: "chat.reply.completed", failed: "chat.reply.failed"}
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.parametrize(("outcome", "code"), [("COMPLETED", 0), ("FAILED", 1), ("CANCELLED", 1)])
def test_watch_after_the_reply_finished_reports_it_at_once(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, outcome: str, code: int
) -> None:
    """1. the reply finished before the watch began 2. watch reports it on its first poll
    3. with the exit code of its outcome."""
    short_id = sim_thread.sim.create_chat("q", outcome=outcome, reply_s=0.0)
    result = qawatch("watch", short_id, env=cli_env, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    (event,) = lines(result.stdout)
    assert event["data"]["message"]["status"] == outcome
    assert gets(sim_thread, short_id) == 1


def test_watch_waits_for_the_reply_to_a_follow_up(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a finished reply, then a user follow-up (newest message) 2. watch starts and polls
    3. it prints nothing while the follow-up waits 4. a new reply finishes 5. watch prints the
    new reply, not the previous one, and exits 0."""
    sim = sim_thread.sim
    short_id = sim.create_chat("first", reply="first answer", reply_s=0.0)
    sim.add_message(short_id, "user", "a follow-up")
    process = start("watch", short_id, "--timeout", "15", env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: gets(sim_thread, short_id) >= 3), "watch never polled"
        assert process.poll() is None, "watch exited on the previous turn's reply"
        sim.add_message(short_id, "assistant", "second answer", status="COMPLETED")
        out, err = process.communicate(timeout=10)
    finally:
        reap(process)
    assert process.returncode == 0, err
    (event,) = lines(out)
    assert event["data"]["message"]["text"] == "second answer"


def test_watch_reports_an_unknown_status_once(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. the newest reply has a status qawatch does not know 2. watch --timeout 1 keeps polling
    3. stderr says so once (not silently, not per poll) 4. exit 3, the id named."""
    sim = sim_thread.sim
    short_id = sim.create_chat()
    sim.add_message(short_id, "user", "q")
    sim.add_message(short_id, "assistant", "thinking...", status="THINKING")
    result = qawatch("watch", short_id, "--timeout", "1", env=cli_env, cwd=tmp_path)
    assert result.returncode == 3
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("THINKING") == 1
    assert gets(sim_thread, short_id) > 2  # it went on polling after the first report
    assert f"qawatch: {short_id}: no finished reply within 1s" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_watch_signal_ends_the_wait(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, signum: int
) -> None:
    """1. watch waits for a slow reply 2. SIGTERM or SIGINT (Ctrl-C) 3. it exits at once, not
    with 0 (no reply was seen): 3, like a timeout, naming the unfinished id; no traceback."""
    short_id = sim_thread.sim.create_chat("slow", reply_s=60)
    process = start("watch", short_id, env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: gets(sim_thread, short_id) >= 2), "watch never polled"
        out, err, took = stop(process, signum=signum)
    finally:
        reap(process)
    assert took < 3.0
    assert process.returncode == 3, err
    assert out == ""
    assert short_id in one_line_error(err)
    assert "interrupted" in err


# ---------------------------------------------------------------------------------------
# ask


def test_ask_creates_a_chat_and_prints_the_reply(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. ask "question" 2. one POST creates a chat; its id is on stderr 3. the reply's event
    is on stdout, exit 0."""
    result = qawatch("ask", "Is the pricing page up?", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (event,) = lines(result.stdout)
    short_id = event["data"]["conversation"]["shortId"]
    assert re.search(rf"\b{re.escape(short_id)}\b", result.stderr)
    assert event["type"] == "chat.reply.completed"
    assert "Is the pricing page up?" in event["data"]["message"]["text"]
    creates = [r for r in sim_thread.sim.requests if r.method == "POST" and r.path == "/v1/chat"]
    assert len(creates) == 1


def test_ask_follow_up_reports_the_new_reply(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a chat whose first reply finished 2. ask --chat ID "follow-up"
    3. the event is the follow-up's reply, not the first turn's; exit 0."""
    sim = sim_thread.sim
    short_id = sim.create_chat("first", reply="first answer", reply_s=0.0)
    first_reply = sim.conversation_json(short_id)["messages"][0]["id"]
    result = qawatch("ask", "--chat", short_id, "follow-up question", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (event,) = lines(result.stdout)
    assert event["data"]["conversation"]["shortId"] == short_id
    assert event["data"]["message"]["id"] != first_reply
    assert "follow-up question" in event["data"]["message"]["text"]
    assert short_id in result.stderr


def test_ask_with_a_refused_token_exits_4(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. ask with a token the API refuses 2. exit 4 with one line, no chat created."""
    env = {**cli_env, "QAWATCH_API__TOKEN": "qwt-WRONG-TOKEN-55aa77"}
    result = qawatch("ask", "hello", env=env, cwd=tmp_path)
    assert result.returncode == 4
    assert "401" in one_line_error(result.stderr)
    assert [r.status for r in sim_thread.sim.requests] == [401]


def test_ask_follow_up_to_unknown_chat_exits_4(cli_env: dict[str, str], tmp_path: Path) -> None:
    """1. ask --chat with an id the API does not know 2. exit 4, one line, no traceback."""
    result = qawatch("ask", "--chat", "chat_gone", "hello", env=cli_env, cwd=tmp_path)
    assert result.returncode == 4
    assert "chat_gone" in one_line_error(result.stderr)


CONVERSATION = json.dumps(
    {"shortId": "chat_abc", "createdAt": "2026-11-27T10:00:00Z", "updatedAt": "2026-11-27T10:00:00Z"}
)
#: (ask's extra arguments, answers before the request that hangs, what stderr must say)
ASK_PHASES = {
    "new-chat-post": ((), (), "starting a new chat"),
    "baseline-get": (("--chat", "chat_abc"), (), "reading chat_abc"),
    "follow-up-post": (
        ("--chat", "chat_abc"),
        (Answer(200, CONVERSATION),),
        "sending the follow-up to chat_abc",
    ),
}


@pytest.mark.parametrize("case", ASK_PHASES.values(), ids=ASK_PHASES.keys())
async def test_ask_signal_while_the_api_does_not_answer_exits_3(
    subprocess_env: dict[str, str], tmp_path: Path, case: tuple[tuple[str, ...], tuple[Answer, ...], str]
) -> None:
    """1. an API that never answers one of ask's requests (creating the chat, reading the chat
    before a follow-up, or posting the follow-up) 2. SIGTERM once that request is in flight
    3. ask exits 3 within seconds, as an interrupted watch does 4. one stderr line says what it
    was doing; nothing on stdout."""
    args, before, doing = case
    api = await Receiver(*before, default=Answer(hold=True)).start()
    env = {**subprocess_env, "QAWATCH_API__TOKEN": "sim-token", "QAWATCH_API__TIMEOUT_S": "60"}
    process = await asyncio.create_subprocess_exec(
        *QAWATCH,
        "ask",
        *args,
        "--base-url",
        f"http://127.0.0.1:{api.port}",
        "run the smoke test",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await until(lambda: len(api.hits) > len(before), within=10, what="ask's request")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 10)
        took = time.monotonic() - started
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await api.stop()
    assert process.returncode == 3, err
    assert took < 3.0
    assert out == b""
    line = one_line_error(err.decode())
    assert "interrupted while " + doing in line, line


def chat_json(short_id: str, *replies: str, user: str | None = None) -> str:
    """A conversation body, newest first: one COMPLETED assistant reply per text in
    ``replies``; with ``user``, a user message with that text below the first reply."""
    now = "2026-11-27T10:00:00Z"
    messages = [
        {"id": f"msg_{text}", "role": "assistant", "createdAt": now, "text": text, "status": "COMPLETED"}
        for text in replies
    ]
    if user is not None:
        messages.insert(1, {"id": "msg_user", "role": "user", "createdAt": now, "text": user})
    return json.dumps({"shortId": short_id, "createdAt": now, "updatedAt": now, "messages": messages})


TOO_MANY = Answer(429, '{"message": "Too many requests"}', headers={"Retry-After": "1"})


async def ask_against(api: Receiver, env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    """Run ``qawatch ask ARGS`` against the scripted ``api`` (fast polling); exit code, out, err."""
    env = {
        **env,
        "QAWATCH_API__TOKEN": "sim-token",
        "QAWATCH_API__TIMEOUT_S": "5",
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
        "QAWATCH_POLL__JITTER": "0",
        "QAWATCH_POLL__ERROR_BACKOFF_MAX_S": "0.2",
    }
    try:
        return await qawatch_async(
            "ask", "--base-url", f"http://127.0.0.1:{api.port}", *args, env=env, cwd=cwd
        )
    finally:
        await api.stop()


async def test_ask_waits_out_a_429_on_the_new_chat_post(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """1. the API answers ask's POST /v1/chat with 429 Retry-After: 1 (not processed), then 202
    2. ask posts again after about a second, as the design's error table says
    3. the reply's event is on stdout, exit 0."""
    api = await Receiver(
        TOO_MANY, Answer(202, chat_json("chat_new1")), default=Answer(200, chat_json("chat_new1", "done"))
    ).start()
    code, out, err = await ask_against(api, subprocess_env, tmp_path, "--timeout", "15", "hello")
    assert code == 0, err
    assert "chat_new1" in err
    assert "429" in err
    (event,) = lines(out)
    assert event["data"]["message"]["text"] == "done"
    posts = [hit for hit in api.hits if hit.method == "POST"]
    assert [hit.answer.status for hit in posts] == [429, 202]
    assert posts[1].at - posts[0].at >= 0.9


async def test_ask_retries_the_baseline_get_after_429_and_5xx(
    subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """1. ask --chat: reading the chat first is answered 429, then 503, then 200 2. ask reads
    again each time (a GET changes nothing) 3. the follow-up is posted once and its reply is
    on stdout, exit 0."""
    api = await Receiver(
        TOO_MANY,
        Answer(503, '{"message": "unavailable"}'),
        Answer(200, chat_json("chat_abc", "old")),
        Answer(202, ""),
        default=Answer(200, chat_json("chat_abc", "new", "old", user="hi")),
    ).start()
    code, out, err = await ask_against(
        api, subprocess_env, tmp_path, "--chat", "chat_abc", "--timeout", "15", "hi"
    )
    assert code == 0, err
    assert [(hit.method, hit.answer.status) for hit in api.hits[:4]] == [
        ("GET", 429),
        ("GET", 503),
        ("GET", 200),
        ("POST", 202),
    ]
    assert [hit.method for hit in api.hits].count("POST") == 1
    (event,) = lines(out)
    assert event["data"]["message"]["text"] == "new"


async def test_ask_does_not_retry_a_post_after_a_5xx(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. the API answers ask's POST /v1/chat with 503 (it may have created the chat)
    2. ask does not post again 3. exit 4 with one stderr line saying it may have been processed."""
    api = await Receiver(default=Answer(503, '{"message": "unavailable"}')).start()
    code, out, err = await ask_against(api, subprocess_env, tmp_path, "--timeout", "15", "hello")
    assert code == 4, err
    assert out == ""
    line = one_line_error(err)
    assert "503" in line
    assert "not retried: it may have been processed" in line, line
    assert [hit.method for hit in api.hits] == ["POST"]


async def test_ask_429_beyond_the_timeout_exits_3(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. the API answers ask's POST with 429 Retry-After: 60 2. ask --timeout 2 does not wait
    past its timeout 3. exit 3 within seconds; stderr says it was starting a new chat."""
    api = await Receiver(
        default=Answer(429, '{"message": "Too many requests"}', headers={"Retry-After": "60"})
    ).start()
    started = time.monotonic()
    code, out, err = await ask_against(api, subprocess_env, tmp_path, "--timeout", "2", "hello")
    assert code == 3, err
    assert time.monotonic() - started < 8
    assert out == ""
    assert "starting a new chat" in err, err
    assert "429" in err
    assert [hit.method for hit in api.hits] == ["POST"]


#: runs ``qawatch`` with an API client whose close never finishes (a connection that hangs)
HANGING_CLOSE = r"""
import asyncio, sys
import daemon.qatech
async def close(self):
    sys.stderr.write("closing the client\n")
    sys.stderr.flush()
    await asyncio.sleep(60)
daemon.qatech.QATechClient.close = close
from daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("command", "code"), [("watch", 3), ("run", 0)])
def test_second_signal_cuts_shutdown_short_with_the_commands_code(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, command: str, code: int
) -> None:
    """1. watch (or run) waits for a slow reply; closing its API client hangs 2. SIGTERM: the
    wait ends and the client is being closed 3. a second SIGTERM 4. it exits at once: 3 for
    watch (no reply was seen, as for one signal), 0 for the daemon; no traceback."""
    short_id = sim_thread.sim.create_chat("slow", reply_s=60)
    args = (
        [short_id]
        if command == "watch"
        else ["--config", str(write_daemon_config(tmp_path, [short_id], tmp_path / "out.ndjson"))]
    )
    err_path = tmp_path / "stderr.log"
    with err_path.open("w", encoding="utf-8") as err_file:
        process = subprocess.Popen(
            [sys.executable, "-c", HANGING_CLOSE, command, *args],
            env=cli_env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
        try:
            assert wait_until(lambda: gets(sim_thread, short_id) >= 2), f"{command} never polled"
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: "closing the client" in err_path.read_text(encoding="utf-8"))
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=5)
            took = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
    stderr = err_path.read_text(encoding="utf-8")
    assert process.returncode == code, stderr
    assert took < 3.0
    assert "Traceback" not in stderr
    if code:
        # (then aiohttp's warnings about the session this test's close never closed)
        assert "qawatch: stopped by a second signal" in stderr.splitlines()


# ---------------------------------------------------------------------------------------
# run


def write_daemon_config(tmp_path: Path, ids: list[str], out: Path, *, state: str = "state.db") -> Path:
    config = tmp_path / "daemon.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "watch": {"ids": ids},
                "state": {"path": str(tmp_path / state)},
                "sinks": [{"type": "file", "path": str(out)}],
                "control": {"listen": None},
                "shutdown": {"grace_s": 2},
            }
        ),
        encoding="utf-8",
    )
    return config


def read_events(path: Path) -> list[dict[str, Any]]:
    return lines(path.read_text(encoding="utf-8")) if path.exists() else []


def texts_in(path: Path) -> list[str]:
    return [e["data"]["message"]["text"] for e in read_events(path) if "message" in e["data"]]


def test_run_sigterm_exits_0_with_replies_in_file(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. run with a file sink watching two chats 2. both replies land in the file
    3. SIGTERM 4. exit 0 within a few seconds, each reply in the file once."""
    sim = sim_thread.sim
    ids = [sim.create_chat("one", reply="reply one"), sim.create_chat("two", reply="reply two")]
    out = tmp_path / "replies.ndjson"
    config = write_daemon_config(tmp_path, ids, out)
    process = start("run", "--config", str(config), env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: len(read_events(out)) >= 2), "replies never reached the file"
    finally:
        stdout, stderr, took = stop(process)
    assert process.returncode == 0, stderr
    assert took < 4.0
    assert sorted(texts_in(out)) == ["reply one", "reply two"]
    assert "Traceback" not in stderr
    assert stdout == ""  # no stdout sink configured: stdout stays clean


def _pending_deliveries(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()
    return int(row[0])


def test_run_kill_9_and_restart_reports_every_reply_once(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. run watches two chats; the first reply lands in the file 2. kill -9 (the other chat
    is still waiting) 3. while down, two replies finish 4. restart with the same state file
    5. one more reply finishes after the restart 6. every reply is in the file exactly once."""
    sim = sim_thread.sim
    first = sim.create_chat("a1", reply="A1", reply_s=0.2)
    second = sim.create_chat()  # empty: nothing to report yet
    out = tmp_path / "replies.ndjson"
    config = write_daemon_config(tmp_path, [first, second], out)
    state = tmp_path / "state.db"

    process = start("run", "--config", str(config), env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: texts_in(out) == ["A1"]), "A1 never reached the file"
        # the delivery is acknowledged in the store right after the write; a kill between the
        # two is the at-least-once window, not what this test is about
        assert wait_until(lambda: _pending_deliveries(state) == 0)
        polls_before_kill = gets(sim_thread, second)
        assert wait_until(lambda: gets(sim_thread, second) > polls_before_kill)  # still polling
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)
    finally:
        reap(process)
    assert process.returncode == -signal.SIGKILL

    sim.send_message(first, "a2", reply="A2", reply_s=0.0)  # finish while the daemon is down
    sim.send_message(second, "b1", reply="B1", reply_s=0.0)

    process = start("run", "--config", str(config), env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: len(texts_in(out)) >= 3), "downtime replies never reached the file"
        sim.send_message(second, "b2", reply="B2", reply_s=0.2)  # finishes after the restart
        assert wait_until(lambda: len(texts_in(out)) >= 4), "B2 never reached the file"
        time.sleep(0.3)  # a few more polls: a duplicate would show up now
    finally:
        _, stderr, _ = stop(process)
    assert process.returncode == 0, stderr
    events = read_events(out)
    assert sorted(texts_in(out)) == ["A1", "A2", "B1", "B2"]
    assert len({e["id"] for e in events}) == len(events) == 4


def test_run_and_watch_never_log_the_token(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, token: str
) -> None:
    """1. run and watch at --log-level debug, with transient errors, a 404 and a reply
    2. plenty is logged 3. the token appears in no line of stdout or stderr."""
    sim = sim_thread.sim
    short_id = sim.create_chat("q", reply="the answer")
    sim.inject(Fault("status", status=503), Fault("malformed"), short_id=short_id)
    out = tmp_path / "replies.ndjson"
    config = write_daemon_config(tmp_path, [short_id, "chat_gone"], out)
    process = start("run", "--config", str(config), "--log-level", "debug", env=cli_env, cwd=tmp_path)
    try:
        assert wait_until(lambda: texts_in(out) == ["the answer"])
    finally:
        stdout, stderr, _ = stop(process)
    assert process.returncode == 0, stderr
    assert "chat_gone" in stderr  # the log is not empty: the 404 and errors were logged
    assert token not in stdout + stderr

    sim.inject(Fault("status", status=500), short_id=short_id)
    sim.send_message(short_id, "again")
    result = qawatch("watch", short_id, "--log-level", "debug", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert token not in result.stdout + result.stderr


def log_entries(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon's stderr file (anything else, e.g. a warning, skipped)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def logged_at(path: Path, level: str) -> list[dict[str, Any]]:
    """The log entries at ``level`` about a reload (others, e.g. a transient error, skipped)."""
    return [
        entry
        for entry in log_entries(path)
        if entry.get("level") == level and str(entry.get("event", "")).startswith("reload")
    ]


def ended(path: Path) -> list[dict[str, Any]]:
    return [event for event in read_events(path) if event["type"] == "chat.watch.ended"]


def test_sighup_applies_watch_ids_edited_in_the_yaml(
    cli_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. run with watch.ids [A, B] in its YAML file; both replies reach the file sink
    2. the YAML is edited to [A] and SIGHUP sent 3. B ends as `removed` (a chat.watch.ended
    event in the file) and is polled no more, while A still is 4. an edit to another section
    (api.message_limit) and SIGHUP: one warning names `api` as needing a restart 5. a broken
    YAML and SIGHUP: one error line, A is still watched 6. SIGTERM exits 0."""
    sim = sim_thread.sim
    a, b = sim.create_chat("a", reply="reply A"), sim.create_chat("b", reply="reply B")
    out = tmp_path / "replies.ndjson"
    config = write_daemon_config(tmp_path, [a, b], out)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    err_path = tmp_path / "stderr.log"
    with err_path.open("w", encoding="utf-8") as err_file:
        process = subprocess.Popen(
            [*QAWATCH, "run", "--config", str(config)],
            env=cli_env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
        try:
            assert wait_until(lambda: sorted(texts_in(out)) == ["reply A", "reply B"]), (
                "replies never arrived"
            )

            data["watch"]["ids"] = [a]
            config.write_text(yaml.safe_dump(data), encoding="utf-8")
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: len(ended(out)) == 1), "B never ended"
            assert ended(out)[0]["data"] == {"conversation": {"shortId": b}, "reason": "removed"}
            polls_of_a = gets(sim_thread, a)
            assert wait_until(lambda: gets(sim_thread, a) > polls_of_a)  # a poll of B in flight is done
            polls_of_b, polls_of_a = gets(sim_thread, b), gets(sim_thread, a)
            assert wait_until(lambda: gets(sim_thread, a) >= polls_of_a + 3), "A is no longer polled"
            assert gets(sim_thread, b) == polls_of_b, "B is still polled"

            data["api"] = {"message_limit": 7}
            config.write_text(yaml.safe_dump(data), encoding="utf-8")
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: bool(logged_at(err_path, "warning"))), (
                "no warning about the api section"
            )
            assert logged_at(err_path, "warning")[0]["sections"] == ["api"]
            assert "restart" in logged_at(err_path, "warning")[0]["event"]

            config.write_text("watch: {ids: [\n", encoding="utf-8")
            process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: bool(logged_at(err_path, "error"))), (
                "no error about the broken configuration"
            )
            assert len(logged_at(err_path, "error")) == 1
            assert str(config) in logged_at(err_path, "error")[0]["error"]
            polls_of_a = gets(sim_thread, a)
            assert wait_until(lambda: gets(sim_thread, a) >= polls_of_a + 3), "A is no longer polled"
            assert len(ended(out)) == 1
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=5)
    assert process.returncode == 0, err_path.read_text(encoding="utf-8")
    assert len(logged_at(err_path, "warning")) == 1
