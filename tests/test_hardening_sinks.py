"""Sinks under a failing environment: a disk that fills up under the file sink (a real short
write and ENOSPC on a small tmpfs, and a deterministic EFBIG from ``RLIMIT_FSIZE`` in a child
process), and a webhook receiver answering 4xx while it deploys."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import make_settings, running, subprocess_env, until
from webhook_receiver import Answer, Receiver, webhook
from webhook_receiver import deliveries as webhook_deliveries

from daemon.simulator import Simulator
from daemon.sinks.file import FileSink

PAGE = 4096


def parsed_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` as JSON; fails on a partial (unterminated or unparsable) line."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"the file ends in a partial line: {data[-80:]!r}"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


# ---------------------------------------------------------------------------- the file sink

#: run in a child process: RLIMIT_FSIZE applies to every file of the process that sets it
#: (and Python ignores SIGXFSZ, so writing past it is EFBIG instead of death)
FSIZE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, resource, sys
    from daemon.errors import SinkError
    from daemon.sinks.file import FileSink

    path, limit = sys.argv[1], int(sys.argv[2])
    first = json.dumps({"id": "evt_1", "text": "a" * 100})
    second = json.dumps({"id": "evt_2", "text": "b" * 300})

    async def main():
        sink = FileSink("file", path)
        await sink.open()
        await sink.send("evt_1", first)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        outcome = {}
        try:
            await sink.send("evt_2", second)
            outcome["failed"] = None
        except SinkError as exc:
            outcome["failed"] = str(exc)
        with open(path, "rb") as f:
            outcome["while_full"] = f.read().decode()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await sink.send("evt_2", second)  # the outbox retries it once there is room
        await sink.close()
        print(json.dumps(outcome))

    asyncio.run(main())
    """
)


def test_short_write_then_efbig_leaves_no_partial_line(tmp_path: Path) -> None:
    """1. a file sink has written one line 2. the file size limit (RLIMIT_FSIZE) leaves room
    for half of the next line: a real short write, then EFBIG 3. the send fails and the file
    holds only the first line, no fragment 4. with room again the retry appends the whole
    line: two lines, both JSON."""
    path = tmp_path / "replies.ndjson"
    first_line = len(json.dumps({"id": "evt_1", "text": "a" * 100})) + 1
    result = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(path), str(first_line + 150)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["failed"] is not None
    assert "File too large" in outcome["failed"]
    assert outcome["while_full"].count("\n") == 1
    assert len(outcome["while_full"]) == first_line, "a fragment of the failed line was left"
    assert [line["id"] for line in parsed_lines(path)] == ["evt_1", "evt_2"]


async def test_a_partial_line_left_by_a_crash_is_cut_before_the_next_write(tmp_path: Path) -> None:
    """1. the file ends in a fragment (a crash or power loss in the middle of a write)
    2. the sink is opened again and sends an event 3. the fragment is gone and the event is a
    line of its own: every line parses."""
    path = tmp_path / "replies.ndjson"
    path.write_bytes(b'{"id": "evt_0"}\n{"id": "evt_1", "te')
    sink = FileSink("file", path)
    await sink.open()
    try:
        await sink.send("evt_1", json.dumps({"id": "evt_1", "text": "whole"}))
    finally:
        await sink.close()
    assert parsed_lines(path) == [{"id": "evt_0"}, {"id": "evt_1", "text": "whole"}]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``where``; the test is skipped, saying why, where mounting
    is not allowed (not root, no CAP_SYS_ADMIN, a locked-down container)."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Take every free page of ``disk`` with one file; returns it (delete it to make room)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left on device"):  # noqa: PT012 - until it is full
            while True:
                os.write(fd, b"\0" * PAGE)
    finally:
        os.close(fd)
    return filler


async def readyz(base: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/readyz") as resp:
        return resp.status, await resp.json()


async def test_disk_full_on_a_real_tmpfs_keeps_whole_lines_and_loses_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    """1. the file sink writes to a 1 MB tmpfs that is full but for 20 bytes at the end of the
    file's last page 2. replies arrive: the first write is a real short write, then ENOSPC
    3. /readyz answers 503 naming the failing sink and the error 4. stopped while the disk is
    still full, the file holds only whole lines (no fragment) 5. room comes back and the daemon
    starts again: every reply is in the file exactly once, every line parses, /readyz is 200."""
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "replies.ndjson"
        seed = json.dumps({"seed": ""})
        seed = json.dumps({"seed": "x" * (PAGE - 20 - len(seed) - 1)}) + "\n"
        out.write_text(seed)
        assert out.stat().st_size == PAGE - 20
        filler = fill(disk)
        chats = [sim.create_chat(f"q{i}?", reply=f"answer {i} " + "z" * 200, reply_s=0.1) for i in range(3)]
        settings = make_settings(
            sim,
            tmp_path,
            chats,
            sinks=[{"type": "file", "path": out}],
            control={"listen": "127.0.0.1:0"},
        )

        async with running(settings) as app:
            assert app.control is not None
            base = f"http://127.0.0.1:{app.control.bound_port}"

            async def failing() -> bool:
                status, body = await readyz(base)
                return status == 503 and any("sink file is failing" in p for p in body["problems"])

            await until(failing, within=10, what="/readyz naming the failing file sink")
            _, body = await readyz(base)
            assert any("No space left on device" in problem for problem in body["problems"]), body
        assert out.read_text() == seed, "a partial line was left in the file"

        filler.unlink()
        async with running(settings) as app:
            assert app.control is not None
            base = f"http://127.0.0.1:{app.control.bound_port}"
            await until(lambda: len(parsed_lines(out)) == 1 + len(chats), within=15, what="every reply")
            assert (await readyz(base))[0] == 200
        events = parsed_lines(out)[1:]
        assert sorted(event["data"]["conversation"]["shortId"] for event in events) == sorted(chats)
        assert len({event["id"] for event in events}) == len(chats)


# ---------------------------------------------------------------------------- the webhook sink


def states(tmp_path: Path) -> list[tuple[str, int, str | None]]:
    return [
        (state, attempts, error) for _, state, attempts, error in webhook_deliveries(tmp_path / "state.db")
    ]


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_webhook_4xx_during_a_deploy_is_retried_not_dead_lettered(
    sim: Simulator, tmp_path: Path, receiver: Receiver, status: int
) -> None:
    """1. the receiver is deploying: it answers ``status`` twice, then 200 2. the event is
    retried on the schedule (same webhook-id each time), not dead-lettered 3. it is delivered
    on the third attempt."""
    receiver.answer(Answer(status, body="deploying"), Answer(status, body="deploying"))
    chat = sim.create_chat("q?", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [chat], sinks=[webhook(receiver)])
    async with running(settings):
        await until(lambda: [s for s, _, _ in states(tmp_path)] == ["delivered"], what="the delivery")
    assert [hit.answer.status for hit in receiver.hits] == [status, status, 200]
    assert len({hit.id for hit in receiver.hits}) == 1
    assert states(tmp_path)[0][1] == 3


async def test_webhook_4xx_dead_letters_only_once_the_schedule_is_spent(
    sim: Simulator, tmp_path: Path, receiver: Receiver
) -> None:
    """1. the receiver always answers 404 2. with a schedule of two retries there are three
    attempts 3. then the event is dead-lettered, saying so, with the last answer."""
    receiver.default = Answer(404, body="no such hook")
    chat = sim.create_chat("q?", reply_s=0.0)
    settings = make_settings(sim, tmp_path, [chat], sinks=[webhook(receiver, retry_schedule_s=[0.1, 0.1])])
    async with running(settings):
        await until(lambda: [s for s, _, _ in states(tmp_path)] == ["dead"], what="the dead letter")
    assert len(receiver.hits) == 3
    _, attempts, error = states(tmp_path)[0]
    assert attempts == 3
    assert error is not None
    assert "gave up after 3 attempts" in error
    assert "HTTP 404: no such hook" in error
