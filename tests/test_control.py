"""The control API, metrics and readiness over real HTTP, with the simulator as upstream."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import closed_port, make_settings, subprocess_env, until
from support import running as run_daemon

from daemon.app import App
from daemon.control import watch_json
from daemon.settings import Settings
from daemon.simulator import SimConfig, Simulator, SimulatorThread
from daemon.store import SqliteStore

TOKEN = "sim-token-control"
CONTROL_TOKEN = "ctl-secret-token-42"


@pytest.fixture
def sim_config() -> SimConfig:
    """The ``sim`` fixture's simulator: this file's token, seed 3."""
    return SimConfig(token=TOKEN, reply_s=0.3, seed=3)


def settings_for(sim: Simulator, tmp_path: Path, ids: list[str] | None = None, **control: Any) -> Settings:
    return make_settings(
        sim,
        tmp_path,
        ids or [],
        api={"token": TOKEN},
        sinks=[{"type": "file", "path": tmp_path / "out.ndjson"}],
        control={"listen": "127.0.0.1:0", **control},
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[App, str]]:
    """Run the daemon until the block ends (:func:`support.running`); yield it and the base URL
    of its control API."""
    async with run_daemon(settings) as app:
        assert app.control is not None
        yield app, f"http://127.0.0.1:{app.control.bound_port}"


async def call(method: str, url: str, token: str | None = None, **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers, **kwargs) as resp,
    ):
        body = (
            await resp.json(content_type=None)
            if resp.content_type == "application/json"
            else await resp.text()
        )
        return resp.status, body


async def test_add_list_remove_watches_over_http(sim: Simulator, tmp_path: Path) -> None:
    """1. a daemon with one configured watch 2. PUT adds a runtime watch (201), again 200
    3. GET lists both with their sources 4. the runtime one's reply is delivered 5. DELETE
    ends it as removed 6. DELETE of the configured one is refused (409)."""
    configured = sim.create_chat("configured?")
    runtime = sim.create_chat("runtime?")
    async with running(settings_for(sim, tmp_path, [configured])) as (app, base):
        status, body = await call("PUT", f"{base}/v1/watches/{runtime}", json={"backfill": "latest"})
        assert status == 201
        assert body["short_id"] == runtime
        assert body["source"] == "runtime"
        status, _ = await call("PUT", f"{base}/v1/watches/{runtime}")
        assert status == 200
        status, body = await call("GET", f"{base}/v1/watches")
        assert status == 200
        sources = {w["short_id"]: w["source"] for w in body["watches"]}
        assert sources == {configured: "config", runtime: "runtime"}
        out = tmp_path / "out.ndjson"
        await until(lambda: out.exists() and out.read_text().count("chat.reply.completed") == 2)
        status, body = await call("DELETE", f"{base}/v1/watches/{runtime}")
        assert status == 200
        assert (body["state"], body["reason"]) == ("ended", "removed")
        assert runtime not in app.poller.watches  # type: ignore[union-attr]
        status, body = await call("DELETE", f"{base}/v1/watches/{configured}")
        assert status == 409
        assert "configuration" in body["message"]
        status, body = await call("GET", f"{base}/v1/watches/{runtime}")
        assert (status, body["state"]) == (200, "ended")
    assert '"reason":"removed"' in out.read_text()


async def test_bad_ids_and_bodies_are_400_with_a_message(sim: Simulator, tmp_path: Path) -> None:
    """1. PUT with an invalid id 2. 400 naming it 3. a body that is not JSON or has unknown
    keys or a bad backfill: 400 4. GET/DELETE of an unknown id: 404."""
    async with running(settings_for(sim, tmp_path)) as (_, base):
        status, body = await call("PUT", f"{base}/v1/watches/not-a-chat")
        assert status == 400
        assert "not-a-chat" in body["message"]
        for payload in (b"{nope", b'{"color": "red"}', b'{"backfill": "all"}', b"[1]"):
            status, body = await call("PUT", f"{base}/v1/watches/chat_ok", data=payload)
            assert status == 400, payload
            assert body["message"]
        assert (await call("GET", f"{base}/v1/watches/chat_unknown"))[0] == 404
        assert (await call("DELETE", f"{base}/v1/watches/chat_unknown"))[0] == 404


async def test_bearer_token_required_when_configured(sim: Simulator, tmp_path: Path) -> None:
    """1. control.token set 2. no or wrong token: 401 on watches, readyz and metrics
    3. /healthz stays open 4. the right token works."""
    settings = settings_for(sim, tmp_path, token=CONTROL_TOKEN)
    async with running(settings) as (_, base):
        for path in ("/v1/watches", "/readyz", "/metrics"):
            assert (await call("GET", base + path))[0] == 401
            assert (await call("GET", base + path, token="wrong"))[0] == 401
            assert (await call("GET", base + path, token=CONTROL_TOKEN))[0] == 200
        assert (await call("GET", base + "/healthz"))[0] == 200
        assert (await call("PUT", base + "/v1/watches/chat_x"))[0] == 401


async def test_runtime_watches_persist_across_restart(sim: Simulator, tmp_path: Path) -> None:
    """1. a watch added at runtime 2. the daemon restarts with an empty configuration
    3. the watch is still there and polled 4. a removed one stays ended."""
    kept = sim.create_chat("kept?")
    dropped = sim.create_chat("dropped?")
    settings = settings_for(sim, tmp_path)
    async with running(settings) as (_, base):
        assert (await call("PUT", f"{base}/v1/watches/{kept}"))[0] == 201
        assert (await call("PUT", f"{base}/v1/watches/{dropped}"))[0] == 201
        assert (await call("DELETE", f"{base}/v1/watches/{dropped}"))[0] == 200
    before = len(sim.requests_for(kept))
    async with running(settings) as (app, base):
        assert kept in app.poller.watches  # type: ignore[union-attr]
        assert dropped not in app.poller.watches  # type: ignore[union-attr]
        await until(lambda: len(sim.requests_for(kept)) > before)
        _, body = await call("GET", f"{base}/v1/watches")
        states = {w["short_id"]: w["state"] for w in body["watches"]}
        assert states == {kept: "active", dropped: "ended"}


async def test_metrics_scrape_has_the_families(sim: Simulator, tmp_path: Path) -> None:
    """1. a daemon delivers one reply 2. /metrics parses with prometheus-client's parser
    3. every family the issue names is there, with sensible values."""
    chat = sim.create_chat("metrics?")
    async with running(settings_for(sim, tmp_path, [chat])) as (_, base):
        out = tmp_path / "out.ndjson"
        await until(lambda: out.exists() and "chat.reply.completed" in out.read_text())
        status, text = await call("GET", base + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "qawatch_polls",
        "qawatch_poll_duration_seconds",
        "qawatch_watches",
        "qawatch_events",
        "qawatch_deliveries",
        "qawatch_outbox_pending",
        "qawatch_rate_limit_waits",
        "qawatch_detection_delay_seconds",
    }
    assert expected <= set(families)
    assert "qawatch_build" in families or "qawatch_build_info" in families

    def value(name: str, **labels: str) -> float:
        for family in families.values():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise AssertionError(f"no sample {name} {labels}")

    assert value("qawatch_polls_total", outcome="ok") >= 2
    assert value("qawatch_events_total", type="chat.reply.completed") == 1
    assert value("qawatch_deliveries_total", sink="file", outcome="delivered") == 1
    assert value("qawatch_outbox_pending", sink="file") == 0
    assert value("qawatch_watches", state="active") == 1
    assert value("qawatch_detection_delay_seconds_count") == 1
    assert value("qawatch_poll_duration_seconds_count") >= 2
    assert value("qawatch_build_info", version="0.1.0") == 1


async def test_readiness_false_while_token_refused(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. the daemon runs with a token the API refuses 2. /readyz is 503 naming the token
    and /healthz is 200 3. the token is accepted again 4. /readyz turns 200."""
    import daemon.scheduler

    monkeypatch.setattr(daemon.scheduler, "AUTH_PAUSE_BASE_S", 0.2)
    chat = sim.create_chat("ready?")
    sim.config.token = "something-else"
    async with running(settings_for(sim, tmp_path, [chat])) as (_, base):
        await until(lambda: any(r.status == 401 for r in sim.requests))
        status, body = await call("GET", base + "/readyz")
        assert status == 503
        assert any("token" in problem for problem in body["problems"])
        assert (await call("GET", base + "/healthz"))[0] == 200
        sim.config.token = TOKEN

        async def ready() -> bool:
            return (await call("GET", base + "/readyz"))[0] == 200

        await until(ready, within=5)


def test_control_listen_off_loopback_needs_a_token(tmp_path: Path) -> None:
    """1. control.listen on 0.0.0.0 without a token 2. check-config exits 2 naming control.token."""
    env = subprocess_env() | {"QAWATCH_API__TOKEN": "x", "QAWATCH_CONTROL__LISTEN": "0.0.0.0:8787"}
    done = qawatch(env, tmp_path, "check-config")
    assert done.returncode == 2
    assert "control.token" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[tuple[Any, dict[str, str], Path, subprocess.Popen[str]]]:
    """A `qawatch run` subprocess against a simulator thread, with a free control port."""
    with SimulatorThread(SimConfig(token=TOKEN, reply_s=0.3)) as thread:
        env = subprocess_env() | {
            "QAWATCH_API__TOKEN": TOKEN,
            "QAWATCH_API__BASE_URL": thread.base_url,
            "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
            "QAWATCH_POLL__IDLE_INTERVAL_S": "0.2",
            "QAWATCH_CONTROL__LISTEN": f"127.0.0.1:{closed_port()}",
            "QAWATCH_CONTROL__TOKEN": CONTROL_TOKEN,
            "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
            "QAWATCH_SINKS": f'[{{"type":"file","path":"{tmp_path / "out.ndjson"}"}}]',
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            yield thread, env, tmp_path, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert proc.returncode == 0, err
            assert CONTROL_TOKEN not in err


def qawatch(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cli_add_list_remove_health(
    daemon_process: tuple[Any, dict[str, str], Path, subprocess.Popen[str]],
) -> None:
    """1. a running daemon 2. `qawatch health` waits until ready (exit 0) 3. `add` two ids
    4. `list` shows a table with both 5. their replies arrive 6. `remove` one 7. `list --json`
    shows it ended 8. a bad id exits 2."""
    thread, env, tmp_path, _ = daemon_process
    deadline = time.monotonic() + 10
    while qawatch(env, tmp_path, "health").returncode != 0:
        assert time.monotonic() < deadline, "daemon never became ready"
        time.sleep(0.1)
    a, b = thread.sim.create_chat("a?"), thread.sim.create_chat("b?")
    added = qawatch(env, tmp_path, "add", a, b, "--backfill", "latest")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [f"added: {a}", f"added: {b}"]
    listed = qawatch(env, tmp_path, "list")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "STATE", "SOURCE"]
    assert a in listed.stdout
    assert b in listed.stdout
    out = tmp_path / "out.ndjson"
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text().count("chat.reply.completed") == 2):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    removed = qawatch(env, tmp_path, "remove", a)
    assert (removed.returncode, removed.stdout.strip()) == (0, f"removed: {a}")
    import json

    rows = {row["short_id"]: row for row in json.loads(qawatch(env, tmp_path, "list", "--json").stdout)}
    assert rows[a]["state"] == "ended"
    assert rows[b]["state"] == "active"
    bad = qawatch(env, tmp_path, "add", "nope")
    assert bad.returncode == 2
    assert "nope" in bad.stderr
    unknown = qawatch(env, tmp_path, "remove", "chat_never")
    assert unknown.returncode == 2


#: ids the id pattern accepts but that mean something else in a URL path unless quoted
ODD_IDS = ("chat_q?x=1", "chat_h#frag", "chat_p%2Fq", "chat_s;v=1")


def test_cli_add_and_remove_send_ids_with_url_characters_intact(
    daemon_process: tuple[Any, dict[str, str], Path, subprocess.Popen[str]],
) -> None:
    """1. a running daemon 2. `qawatch add` ids holding ?, #, % and ; 3. `list --json` shows
    exactly those ids (not cut at the ? or #, not decoded twice) 4. `remove` ends each of them."""
    thread, env, tmp_path, _ = daemon_process
    for short_id in ODD_IDS:  # `add` asks the API first: they must exist there
        thread.sim.create_chat(short_id=short_id)
    wait_for(lambda: qawatch(env, tmp_path, "health").returncode == 0)
    added = qawatch(env, tmp_path, "add", *ODD_IDS, "--backfill", "none")
    assert added.returncode == 0, added.stderr
    assert added.stdout.splitlines() == [f"added: {short_id}" for short_id in ODD_IDS]
    listed = qawatch(env, tmp_path, "list", "--json")
    assert sorted(row["short_id"] for row in json.loads(listed.stdout)) == sorted(ODD_IDS)
    removed = qawatch(env, tmp_path, "remove", *ODD_IDS)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [f"removed: {short_id}" for short_id in ODD_IDS]
    rows = json.loads(qawatch(env, tmp_path, "list", "--json").stdout)
    assert {row["short_id"]: row["state"] for row in rows} == dict.fromkeys(ODD_IDS, "ended")


def test_health_fails_when_no_daemon_runs(tmp_path: Path) -> None:
    """1. nothing listens on the control port 2. `qawatch health` exits 1 with one line."""
    env = subprocess_env() | {"QAWATCH_CONTROL__LISTEN": f"127.0.0.1:{closed_port()}"}
    done = qawatch(env, tmp_path, "health")
    assert done.returncode == 1
    assert "cannot reach" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_sighup_reopens_the_file_sink_after_logrotate_rename(
    daemon_process: tuple[Any, dict[str, str], Path, subprocess.Popen[str]],
) -> None:
    """1. a running daemon writes a reply to out.ndjson 2. logrotate renames it to out.ndjson.1
    3. SIGHUP 4. the next reply lands in a new out.ndjson (mode 0600), the old file keeps one."""
    thread, env, tmp_path, proc = daemon_process
    wait_for(lambda: qawatch(env, tmp_path, "health").returncode == 0)
    out, rotated = tmp_path / "out.ndjson", tmp_path / "out.ndjson.1"
    first = thread.sim.create_chat("first?")
    assert qawatch(env, tmp_path, "add", first).returncode == 0
    wait_for(lambda: out.exists() and "chat.reply.completed" in out.read_text())
    out.rename(rotated)
    proc.send_signal(signal.SIGHUP)
    wait_for(out.exists)  # reopened at the original path
    second = thread.sim.create_chat("second?")
    assert qawatch(env, tmp_path, "add", second).returncode == 0
    wait_for(lambda: second in out.read_text())
    assert rotated.read_text().count("\n") == 1
    assert first in rotated.read_text()
    assert first not in out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600


def test_watch_file_edits_are_picked_up_without_restart(tmp_path: Path) -> None:
    """1. a daemon watches a watch.file with one id 2. an id is appended to the file (no
    signal) 3. its reply arrives 4. the first id is deleted from the file 5. it ends as removed."""
    with SimulatorThread(SimConfig(token=TOKEN, reply_s=0.3)) as thread:
        a, b = thread.sim.create_chat("a?"), thread.sim.create_chat("b?")
        watch_file = tmp_path / "ids.txt"
        watch_file.write_text(f"# watched chats\n{a}\n")
        out = tmp_path / "out.ndjson"
        env = subprocess_env() | {
            "QAWATCH_API__TOKEN": TOKEN,
            "QAWATCH_API__BASE_URL": thread.base_url,
            "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
            "QAWATCH_POLL__IDLE_INTERVAL_S": "0.2",
            "QAWATCH_CONTROL__LISTEN": "null",
            "QAWATCH_WATCH__FILE": str(watch_file),
            "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
            "QAWATCH_SINKS": f'[{{"type":"file","path":"{out}"}}]',
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: out.exists() and a in out.read_text())
            watch_file.write_text(f"{a}\n{b}  # added later\n")
            wait_for(lambda: b in out.read_text())
            watch_file.write_text(f"{b}\n")
            wait_for(lambda: '"reason":"removed"' in out.read_text())
            assert f'"shortId":"{a}"}},"reason":"removed"' in out.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err


def test_cli_add_of_a_conversation_the_api_does_not_know_exits_4(
    daemon_process: tuple[Any, dict[str, str], Path, subprocess.Popen[str]],
) -> None:
    """1. a running daemon 2. `qawatch add chat_doesnotexist` 3. the daemon asks the API: 404
    4. exit 4 with one line saying so, and nothing is watched."""
    _, env, tmp_path, _ = daemon_process
    wait_for(lambda: qawatch(env, tmp_path, "health").returncode == 0)
    added = qawatch(env, tmp_path, "add", "chat_doesnotexist")
    assert added.returncode == 4, added.stderr
    assert added.stdout == ""
    (line,) = added.stderr.strip().splitlines()
    assert "chat_doesnotexist: the API has no such conversation (404)" in line
    assert json.loads(qawatch(env, tmp_path, "list", "--json").stdout) == []


def test_log_level_debug_shows_the_control_calls_of_list_and_add(
    daemon_process: tuple[Any, dict[str, str], Path, subprocess.Popen[str]],
) -> None:
    """1. `list` and `add` with --log-level debug --log-format json 2. a JSON line per call to
    the daemon on stderr (method, path, status) 3. without the flag, stderr stays empty."""
    thread, env, tmp_path, _ = daemon_process
    thread.sim.create_chat(short_id="chat_dbg")
    wait_for(lambda: qawatch(env, tmp_path, "health").returncode == 0)
    listed = qawatch(env, tmp_path, "list", "--log-level", "debug", "--log-format", "json")
    assert listed.returncode == 0, listed.stderr
    (line,) = [json.loads(text) for text in listed.stderr.splitlines()]
    assert (line["event"], line["method"], line["path"], line["status"]) == (
        "control API",
        "GET",
        "/v1/watches",
        200,
    )
    added = qawatch(env, tmp_path, "add", "chat_dbg", "--log-level", "debug", "--log-format", "json")
    assert added.returncode == 0, added.stderr
    assert [json.loads(text)["method"] for text in added.stderr.splitlines()] == ["PUT"]
    assert qawatch(env, tmp_path, "list").stderr == ""


def test_watch_json_says_sources_as_booleans(tmp_path: Path) -> None:
    """Review: 1. a configured watch read from the store (which keeps 0/1) 2. the API body
    says `"in_config": true, "in_runtime": false`, JSON booleans as before."""
    store = SqliteStore(tmp_path / "state.db")
    store.open()
    store.sync_config_watches(["chat_a"], "latest", 1.0)
    row = store.get_watch("chat_a")
    store.close()
    assert row is not None
    body = json.loads(json.dumps(watch_json(row)))
    assert body["in_config"] is True
    assert body["in_runtime"] is False
