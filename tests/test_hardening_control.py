"""The control API against hostile clients, over raw sockets to a real `qawatch run`.

Each request is written as bytes on an asyncio stream (no HTTP client to tidy it up): a
non-UTF-8 ``Authorization`` header, a header line over the parser's limit, a body nested too
deeply for the JSON parser, ids with a newline, a NUL or too many characters. Every answer must
be a 4xx, the daemon must keep serving, and its stderr must stay one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from support import QAWATCH, TOKEN, closed_port, subprocess_env, until

from daemon.simulator import Simulator

CONTROL_TOKEN = "ctl-hardening-token-93"
AUTH = f"Authorization: Bearer {CONTROL_TOKEN}\r\n".encode()


@dataclass
class Control:
    port: int
    stderr_path: Path

    async def request(self, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
        """Send ``head`` (request line and headers, without the blank line) and ``body`` on a
        fresh connection; (status, body) of the answer, read until the server closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
            writer.write(head + length + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1."), answer[:200]
        return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@contextlib.asynccontextmanager
async def daemon(sim: Simulator, tmp_path: Path) -> AsyncIterator[Control]:
    """`qawatch run` with a control token and JSON logs; on exit it must stop with 0 and its
    stderr must be JSON lines only, without a traceback."""
    port = closed_port()
    env = subprocess_env() | {
        "QAWATCH_API__TOKEN": TOKEN,
        "QAWATCH_API__BASE_URL": sim.base_url,
        "QAWATCH_CONTROL__LISTEN": f"127.0.0.1:{port}",
        "QAWATCH_CONTROL__TOKEN": CONTROL_TOKEN,
        "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
        "QAWATCH_SINKS": json.dumps([{"type": "file", "path": str(tmp_path / "out.ndjson")}]),
        "QAWATCH_LOG__FORMAT": "json",
        "QAWATCH_SHUTDOWN__GRACE_S": "2",
    }
    stderr_path = tmp_path / "daemon.err"
    with stderr_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            *QAWATCH, "run", env=env, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=err
        )
    control = Control(port, stderr_path)

    async def healthy() -> bool:
        try:
            return (await control.request(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"))[0] == 200
        except OSError:
            return False

    try:
        await until(healthy, within=15, what="the control API")
        yield control
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0, stderr_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = stderr_path.read_text(encoding="utf-8", errors="replace")
    assert "Traceback" not in stderr, stderr
    for line in stderr.splitlines():
        assert isinstance(json.loads(line), dict), line
    assert CONTROL_TOKEN not in stderr


def log_entries(control: Control) -> list[dict[str, object]]:
    lines = control.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [json.loads(line) for line in lines]


async def test_hostile_requests_get_a_4xx_and_no_traceback(sim: Simulator, tmp_path: Path) -> None:
    """1. a running daemon with a control token 2. an Authorization header that is not UTF-8,
    with and without a body: 401 3. a header line of 20,000 characters: 4xx, and one JSON log
    line that names the problem 4. a body nested 30,000 deep, without the token: 401, with
    it: 400 naming the problem 5. the daemon still serves the token's owner 6. stopped: exit 0,
    every stderr line is a JSON object, no traceback."""
    async with daemon(sim, tmp_path) as control:
        bad_auth = b"GET /v1/watches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3(\r\n"
        assert (await control.request(bad_auth))[0] == 401
        put_bad_auth = b"PUT /v1/watches/chat_ok HTTP/1.1\r\nHost: x\r\nAuthorization: \x80\x81\r\n"
        assert (await control.request(put_bad_auth, b"{}"))[0] == 401

        long_header = b"GET /v1/watches HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n"
        status, _ = await control.request(long_header)
        assert 400 <= status < 500
        await until(lambda: any(e["event"] == "control API: bad request" for e in log_entries(control)))

        deep = b"[" * 30_000 + b"]" * 30_000
        put = b"PUT /v1/watches/chat_deep HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        assert (await control.request(put, deep))[0] == 401
        status, body = await control.request(put + AUTH, deep)
        assert status == 400
        assert "nested too deeply" in json.loads(body)["message"]
        deep_object = b'{"backfill": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001
        status, _ = await control.request(put + AUTH, deep_object[:60_000])
        assert status == 400

        status, body = await control.request(b"GET /v1/watches HTTP/1.1\r\nHost: x\r\n" + AUTH)
        assert status == 200
        assert json.loads(body) == {"watches": []}


async def test_ids_are_matched_whole_bounded_and_without_control_characters(
    sim: Simulator, tmp_path: Path
) -> None:
    """1. a running daemon 2. PUT with an id ending in a newline (%0A), holding a NUL (%00) or a
    tab, or of 201 characters: 400 naming the id on one line, and nothing is watched 3. an id
    of exactly 200 characters is accepted (201)."""
    longest = "chat_" + "a" * 195
    sim.create_chat(short_id=longest)  # `add` asks the API first: it must exist there
    async with daemon(sim, tmp_path) as control:
        for quoted in ("chat_x%0A", "chat_x%00y", "chat_x%09y", "chat_x%0D", longest + "a"):
            status, body = await control.request(
                f"PUT /v1/watches/{quoted} HTTP/1.1\r\nHost: x\r\n".encode() + AUTH, b"{}"
            )
            assert status == 400, quoted
            message = json.loads(body)["message"]
            assert "not a QA.tech conversation id" in message
            assert "\n" not in message
        status, body = await control.request(b"GET /v1/watches HTTP/1.1\r\nHost: x\r\n" + AUTH)
        assert json.loads(body) == {"watches": []}
        put_longest = f"PUT /v1/watches/{longest} HTTP/1.1\r\nHost: x\r\n".encode() + AUTH
        assert (await control.request(put_longest, b'{"backfill": "none"}'))[0] == 201
