"""The webhook sink as users run it: ``qawatch run`` / ``dead-letters`` / ``check-config``
subprocesses, a simulator upstream and a real aiohttp receiver (``webhook_receiver``), all on
the test's event loop (the subprocesses are asyncio ones, so the loop keeps serving them).

A daemon's stdout and stderr go to files, not pipes: a chatty ``--log-level debug`` run can
never block on a full pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from standardwebhooks import Webhook
from support import QAWATCH, TOKEN, one_line_error, qawatch_async, running, until
from webhook_receiver import SECRET, SECRET_2, Answer, Receiver, deliveries, secret_parts, webhook

import daemon.outbox
from daemon.settings import Settings
from daemon.simulator import Simulator

# ---------------------------------------------------------------------------- helpers


class Daemon:
    """``qawatch run --config FILE`` as a subprocess, its output in files under ``folder``."""

    def __init__(self, config: Path, env: dict[str, str], folder: Path, *extra: str) -> None:
        self.args = ["run", "--config", str(config), *extra]
        self.env = env
        self.folder = folder
        self.process: asyncio.subprocess.Process | None = None
        self.runs = 0

    async def start(self) -> Daemon:
        self.runs += 1
        with (
            (self.folder / f"run{self.runs}.out").open("wb") as out,
            (self.folder / f"run{self.runs}.err").open("wb") as err,
        ):
            self.process = await asyncio.create_subprocess_exec(
                *QAWATCH, *self.args, env=self.env, cwd=self.folder, stdout=out, stderr=err
            )
        return self

    @property
    def stderr(self) -> str:
        return (self.folder / f"run{self.runs}.err").read_text(encoding="utf-8")

    @property
    def stdout(self) -> str:
        return (self.folder / f"run{self.runs}.out").read_text(encoding="utf-8")

    async def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``signum``; (exit code, seconds it took to exit, at most 8 s)."""
        assert self.process is not None
        started = time.monotonic()
        if self.process.returncode is None:
            self.process.send_signal(signum)
        try:
            code = await asyncio.wait_for(self.process.wait(), 8.0)
        finally:
            await self.reap()
        return code, time.monotonic() - started

    async def reap(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def daemon_process(
    config: Path, env: dict[str, str], folder: Path, *extra: str
) -> AsyncIterator[Daemon]:
    """A started ``qawatch run``; killed at the end if the test did not stop it."""
    process = await Daemon(config, env, folder, *extra).start()
    try:
        yield process
    finally:
        await process.reap()


def write_config(tmp_path: Path, ids: Sequence[str], hook: dict[str, Any], *, grace_s: float = 2.0) -> Path:
    config = tmp_path / "qawatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "poll": {"active_interval_s": 0.05, "idle_interval_s": 0.2, "error_backoff_max_s": 0.2},
                "watch": {"ids": list(ids)},
                "state": {"path": str(tmp_path / "state.db")},
                "sinks": [{"type": "file", "path": str(tmp_path / "replies.ndjson")}, hook],
                "control": {"listen": None},
                "shutdown": {"grace_s": grace_s},
            }
        ),
        encoding="utf-8",
    )
    return config


def states(tmp_path: Path) -> list[str]:
    return [state for _, state, _, _ in deliveries(tmp_path / "state.db")]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def run_env(subprocess_env: dict[str, str], sim: Simulator) -> dict[str, str]:
    return {
        **subprocess_env,
        "QAWATCH_API__TOKEN": TOKEN,
        "QAWATCH_API__BASE_URL": sim.base_url,
        "QAWATCH_LOG__FORMAT": "json",
    }


# ---------------------------------------------------------------------------- 1. durability


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm-grace"])
async def test_stopped_while_the_post_is_in_flight_resends_with_the_same_id(
    sim: Simulator, tmp_path: Path, receiver: Receiver, run_env: dict[str, str], signum: int
) -> None:
    """1. ``qawatch run`` POSTs a reply to a receiver that holds the request open
    2. the daemon is killed (kill -9), or gets SIGTERM and waits its 1 s grace for the answer
    that never comes, then exits 0 3. the delivery is still pending in the store
    4. restart, the receiver now answers at once: the event is re-sent with the same
    webhook-id, verifies, and is acknowledged; nothing else is sent."""
    receiver.answer(Answer(hold=True))
    ids = [sim.create_chat("q", short_id="chat_k9", reply="the answer", reply_s=0.0)]
    config = write_config(tmp_path, ids, webhook(receiver), grace_s=1.0)
    async with daemon_process(config, run_env, tmp_path) as qw:
        await until(lambda: receiver.hits, within=10, what="the POST in flight")
        assert states(tmp_path) == ["pending"]
        code, took = await qw.stop(signum)
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, qw.stderr
            assert 0.9 <= took < 4.0, took  # waited for the in-flight POST, up to the grace
        assert states(tmp_path) == ["pending"]
        assert receiver.acked() == []

        await qw.start()
        await until(receiver.acked, within=10, what="the re-sent delivery")
        await until(lambda: states(tmp_path) == ["delivered"], what="acknowledged in the store")
        code, _ = await qw.stop()
        assert code == 0, qw.stderr
    first, again = receiver.hits
    assert again.id == first.id
    assert json.loads(again.body)["id"] == first.id
    assert again.body == first.body
    Webhook(SECRET).verify(again.body, again.headers)


async def test_sigterm_lets_an_in_flight_post_finish(
    sim: Simulator, tmp_path: Path, receiver: Receiver, run_env: dict[str, str]
) -> None:
    """1. the receiver takes 0.6 s to answer 200 2. SIGTERM while the POST is in flight (grace 3 s)
    3. the daemon waits for the answer, records the delivery and exits 0 well within the grace
    4. a restart does not send it again."""
    receiver.default = Answer(delay_s=0.6)
    short_id = sim.create_chat("q", short_id="chat_grace", reply="the answer", reply_s=0.0)
    config = write_config(tmp_path, [short_id], webhook(receiver), grace_s=3.0)
    async with daemon_process(config, run_env, tmp_path) as qw:
        await until(lambda: receiver.hits, within=10, what="the POST in flight")
        code, took = await qw.stop()
        assert code == 0, qw.stderr
        assert took < 2.5
        assert states(tmp_path) == ["delivered"]
        assert len(receiver.acked()) == 1

        await qw.start()
        polls = len(sim.requests_for(short_id))
        await until(
            lambda: len(sim.requests_for(short_id)) >= polls + 5, within=10, what="polls after restart"
        )
        await asyncio.sleep(0.3)
        code, _ = await qw.stop()
        assert code == 0, qw.stderr
    assert len(receiver.hits) == 1


# ---------------------------------------------------------------------------- 2. dead letters


async def test_dead_letters_are_listed_and_replayed_with_the_same_ids(
    sim: Simulator,
    tmp_path: Path,
    receiver: Receiver,
    subprocess_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1. the receiver answers 400 with a JSON error: once the (one-retry) schedule is spent,
    both events are dead-lettered, with the status and the body excerpt 2. ``dead-letters list
    --state`` shows both (and ``--sink file`` none) 3. the receiver is fixed; ``replay --id``
    the first: the running daemon delivers it, with the same webhook-id 4. stop; ``replay
    --all`` requeues the other; a restarted daemon delivers it with its id 5. a replay of an
    unknown id exits 2."""
    monkeypatch.setattr(daemon.outbox, "RECHECK_S", 0.2)  # default 5 s: how soon a replay is seen
    receiver.default = Answer(400, body='{"error": "schema mismatch"}')
    ids = [
        sim.create_chat(f"q{i}", short_id=f"chat_dl{i}", reply=f"answer {i}", reply_s=0.0) for i in range(2)
    ]
    state = tmp_path / "state.db"
    settings = Settings(
        api={"base_url": sim.base_url, "token": TOKEN},
        poll={"active_interval_s": 0.05, "idle_interval_s": 0.2},
        watch={"ids": ids},
        state={"path": state},
        sinks=[
            {"type": "file", "path": tmp_path / "replies.ndjson"},
            webhook(receiver, retry_schedule_s=[0.05]),
        ],
        control={"listen": None},
    )
    env = {**subprocess_env, "QAWATCH_LOG__FORMAT": "json"}

    async def cli(*args: str) -> tuple[int, str, str]:
        return await qawatch_async("dead-letters", *args, "--state", str(state), env=env, cwd=tmp_path)

    async with running(settings):
        await until(lambda: states(tmp_path) == ["dead", "dead"], what="two dead letters")
        event_ids = [event_id for event_id, _, _, _ in deliveries(state)]
        for _, _, attempts, error in deliveries(state):
            assert attempts == 2
            assert error == 'gave up after 2 attempts: webhook: HTTP 400: {"error": "schema mismatch"}'

        code, out, err = await cli("list")
        assert code == 0, err
        rows = out.splitlines()
        assert rows[0].split()[:2] == ["EVENT", "ID"]
        assert len(rows) == 3
        for event_id, row in zip(event_ids, rows[1:], strict=True):
            assert row.startswith(event_id)
            assert " webhook " in row
            assert "HTTP 400" in row
            assert "schema mismatch" in row
            assert re.search(r" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\d+s ago\) ", row), (
                row
            )  # as `list` shows times
        code, out, err = await cli("list", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert [row["event_id"] for row in listed] == event_ids
        assert all(isinstance(row["dead_at"], float) and row["sink"] == "webhook" for row in listed)
        assert (await cli("list", "--sink", "file"))[1] == "no dead letters\n"

        receiver.default = Answer(200)
        code, out, err = await cli("replay", "--id", event_ids[0])
        assert (code, out) == (0, "replayed 1 dead letter\n"), err
        await until(lambda: receiver.acked() == [event_ids[0]], what="the replayed event, live")
        code, out, _ = await cli("list")
        assert event_ids[0] not in out
        assert event_ids[1] in out

    code, out, err = await cli("replay", "--all")
    assert (code, out) == (0, "replayed 1 dead letter\n"), err
    assert (await cli("list"))[1] == "no dead letters\n"
    assert states(tmp_path) == ["delivered", "pending"]

    async with running(settings):
        await until(lambda: states(tmp_path) == ["delivered", "delivered"], what="the replay after restart")
    assert receiver.acked() == event_ids
    # two attempts each before the dead letter, then one replay each, in order
    assert sorted(hit.id for hit in receiver.hits[:4]) == sorted(event_ids * 2)
    assert [hit.id for hit in receiver.hits[4:]] == event_ids
    for hit in receiver.hits:
        Webhook(SECRET).verify(hit.body, hit.headers)

    code, out, err = await cli("replay", "--id", "evt_unknown")
    assert code == 2
    assert "evt_unknown" in one_line_error(err)


# ---------------------------------------------------------------------------- 3. secrets


async def test_run_at_debug_level_never_prints_a_secret(
    sim: Simulator, tmp_path: Path, receiver: Receiver, run_env: dict[str, str]
) -> None:
    """1. ``qawatch run --log-level debug``, two secrets and an Authorization header configured
    2. with one retry, the receiver answers 503, times out, then 400: one event is dead-lettered
    and the other taken 3. the failures are logged 4. no secret, key part or header value is on
    stdout or stderr."""
    receiver.answer(Answer(503, body="busy"), Answer(hold=True), Answer(400, body="bad"))
    ids = [sim.create_chat(f"q{i}", short_id=f"chat_s{i}", reply_s=0.0) for i in range(2)]
    hook = webhook(
        receiver,
        secret=[SECRET, SECRET_2],
        timeout_s=0.3,
        headers={"Authorization": "Bearer hdr-credential-77"},
        retry_schedule_s=[0.1],
    )
    config = write_config(tmp_path, ids, hook)
    async with daemon_process(config, run_env, tmp_path, "--log-level", "debug") as qw:
        await until(lambda: sorted(states(tmp_path)) == ["dead", "delivered"], within=10, what="outcomes")
        code, _ = await qw.stop()
        stderr, stdout = qw.stderr, qw.stdout
    assert code == 0, stderr
    assert "sink failing; will retry" in stderr
    assert "event dead-lettered" in stderr
    assert '"level": "debug"' in stderr or '"log_level": "debug"' in stderr
    assert "timed out" in stderr
    for part in [*secret_parts(SECRET), *secret_parts(SECRET_2), "hdr-credential-77"]:
        assert part not in stderr
        assert part not in stdout


async def test_check_config_redacts_webhook_secrets_and_headers(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. a webhook with two secrets and an Authorization header; another with a secret_file
    2. check-config exits 0 3. the secrets and header values show as '***', the secret_file as
    its path 4. neither secret nor header value is printed."""
    secret_file = tmp_path / "secrets"
    secret_file.write_text(f"{SECRET_2}\n", encoding="utf-8")
    config = tmp_path / "qawatch.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sinks": [
                    {
                        "type": "webhook",
                        "name": "hooks",
                        "url": "https://hooks.example.com/qa",
                        "secret": [SECRET, SECRET_2],
                        "headers": {"Authorization": "Bearer hdr-credential-77"},
                    },
                    {
                        "type": "webhook",
                        "name": "local",
                        "url": "http://127.0.0.1:9/x",
                        "secret_file": str(secret_file),
                    },
                ]
            }
        ),
        encoding="utf-8",
    )
    env = {**subprocess_env, "QAWATCH_API__TOKEN": TOKEN}
    code, out, err = await qawatch_async("check-config", "--config", str(config), env=env, cwd=tmp_path)
    assert code == 0, err
    shown = yaml.safe_load(out)
    first, second = shown["sinks"]
    assert first["secret"] == ["***", "***"]
    assert first["headers"] == {"Authorization": "***"}
    assert second["secret"] is None
    assert second["secret_file"] == str(secret_file)
    for part in [*secret_parts(SECRET), *secret_parts(SECRET_2), "hdr-credential-77"]:
        assert part not in out + err


BAD_SECRET = "whsec_c2VjcmV0LWxlYWt5*nope"  # not base64: must be named, never printed


@dataclass(frozen=True)
class BadHook:
    name: str
    #: the webhook sink's keys (besides type), or a secret file's text under "secret_file_text"
    hook: dict[str, Any]
    key: str
    #: must not appear in the output
    hidden: tuple[str, ...] = ()


BAD_HOOKS = [
    BadHook("bad-secret", {"secret": BAD_SECRET}, "sinks.0.secret", (BAD_SECRET,)),
    BadHook("bad-second-secret", {"secret": [SECRET, BAD_SECRET]}, "sinks.0.secret.1", (SECRET, BAD_SECRET)),
    BadHook("empty-secret", {"secret": "whsec_"}, "sinks.0.secret"),
    BadHook("bad-url", {"url": "ftp://hooks.example.com/qa"}, "sinks.0.url"),
    BadHook("url-without-host", {"url": "https:///qa"}, "sinks.0.url"),
    BadHook(
        "reserved-header",
        {"headers": {"Webhook-Signature": "v1,forged-value"}},
        "sinks.0.headers",
        ("forged-value",),
    ),
    BadHook("content-type-header", {"headers": {"Content-Type": "text/plain"}}, "sinks.0.headers"),
    BadHook(
        "bad-header-name",
        {"headers": {"X Bad": "hdr-credential-77"}},
        "sinks.0.headers",
        ("hdr-credential-77",),
    ),
    BadHook("secret-and-file", {"secret": SECRET, "secret_file": "secrets"}, "sinks.0", (SECRET,)),
    BadHook("zero-timeout", {"timeout_s": 0}, "sinks.0.timeout_s"),
    BadHook("bad-schedule", {"retry_schedule_s": [1, -1]}, "sinks.0.retry_schedule_s.1"),
    BadHook("missing-secret-file", {"secret_file": "missing"}, "sinks.0.secret_file"),
    BadHook("empty-secret-file", {"secret_file_text": "# nothing yet\n\n"}, "sinks.0.secret_file"),
    BadHook(
        "bad-line-in-secret-file",
        {"secret_file_text": f"{SECRET}\n{BAD_SECRET}\n"},
        "sinks.0.secret_file",
        (SECRET, BAD_SECRET),
    ),
]


@pytest.mark.parametrize("case", BAD_HOOKS, ids=[c.name for c in BAD_HOOKS])
async def test_check_config_bad_webhook_exits_2_naming_the_key(
    tmp_path: Path, subprocess_env: dict[str, str], case: BadHook
) -> None:
    """1. a webhook sink with one bad key 2. check-config exits 2 3. one stderr line names the key;
    nothing on stdout; no secret (or header value) is echoed."""
    hook: dict[str, Any] = {"type": "webhook", "url": "https://hooks.example.com/qa", **case.hook}
    if "secret_file_text" in hook:
        (tmp_path / "secrets").write_text(hook.pop("secret_file_text"), encoding="utf-8")
        hook["secret_file"] = "secrets"
    (tmp_path / "qawatch.yaml").write_text(yaml.safe_dump({"sinks": [hook]}), encoding="utf-8")
    env = {**subprocess_env, "QAWATCH_API__TOKEN": TOKEN}
    code, out, err = await qawatch_async("check-config", "--config", "qawatch.yaml", env=env, cwd=tmp_path)
    assert code == 2, out
    message = one_line_error(err)
    assert re.search(rf"(?<![\w.]){re.escape(case.key)}(?!\w)", message), message
    assert out == ""
    for hidden in case.hidden:
        for part in secret_parts(hidden):
            assert part not in err
