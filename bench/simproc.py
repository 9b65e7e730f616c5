"""The benchmark's simulator process, and the handle the bench driver keeps on it.

``python -m bench.simproc --token T`` serves the built-in simulator (:mod:`daemon.simulator`)
with its fast GET server, under uvloop when installed, on the wall clock (``time.time``: the
driver, the daemon and the simulator share it), and keeps a compact log of every GET (per
conversation, its times). A second, small aiohttp server on another port takes the driver's
commands (the admin API below). When listening it prints one JSON line:
``{"api": URL, "admin": URL, "loop": "uvloop"}``.

Admin API: ``POST /chats`` creates conversations, ``POST /posts`` schedules messages (and so
replies) at given wall times, ``GET /stats`` counts GETs, ``GET /log`` returns GET times per
conversation, ``GET /posted`` when each scheduled message was posted, ``POST /reset`` clears
the GET log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from bench.procs import REPO, BenchError, stop_process
from daemon.simulator import SAMPLE_QUESTIONS, SimConfig, Simulator

CHAT_PATH = "/v1/chat/"

try:
    import orjson

    def _dumps(value: object) -> bytes:
        return orjson.dumps(value)

except ImportError:  # the `fast` extra is not installed

    def _dumps(value: object) -> bytes:
        return json.dumps(value).encode()


def chat_ids(prefix: str, count: int) -> list[str]:
    """The short ids ``POST /chats`` gives a group: ``chat_<prefix><000000..>``."""
    return [f"chat_{prefix}{i:06d}" for i in range(count)]


class GetLog:
    """Every GET the simulator answered: times per conversation, counts per status."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.statuses: dict[int, int] = {}
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    def add(self, method: str, path: str, at: float, status: int) -> None:
        if method != "GET":
            return
        short_id = path[len(CHAT_PATH) :]
        times = self.times.get(short_id)
        if times is None:
            self.times[short_id] = [at]
        else:
            times.append(at)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.count += 1
        if self.first is None:
            self.first = at
        self.last = at


class Admin:
    """The admin API over one simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.log = GetLog()
        sim.on_request = self.log.add
        self.posted: dict[str, tuple[float, float]] = {}  # short id -> (posted at, reply ends at)

    def routes(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/chats", self.chats)
        app.router.add_post("/posts", self.posts)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/log", self.get_log)
        app.router.add_get("/posted", self.get_posted)
        app.router.add_post("/reset", self.reset)
        return app

    async def chats(self, request: web.Request) -> web.Response:
        """Create ``count`` conversations ``chat_<prefix>NNNNNN``: ``idle`` (a finished reply),
        ``pending`` (a reply that takes ``reply_s``) or ``empty`` (no message yet)."""
        body = await request.json()
        kind, reply_s = body["kind"], float(body.get("reply_s", 3600.0))
        ids = chat_ids(body["prefix"], int(body["count"]))
        for i, short_id in enumerate(ids):
            question = SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)]
            if kind == "empty":
                self.sim.create_chat(short_id=short_id)
            else:
                self.sim.create_chat(question, short_id=short_id, reply_s=0.0 if kind == "idle" else reply_s)
        return web.json_response({"ids": len(ids)})

    async def posts(self, request: web.Request) -> web.Response:
        """Post a message to each listed conversation at a wall time: ``[[id, at, reply_s,
        stream_share], ...]``; its reply takes ``reply_s`` and streams the last share of it."""
        loop = asyncio.get_running_loop()
        posts = (await request.json())["posts"]
        for short_id, at, reply_s, share in posts:
            delay = max(0.0, float(at) - time.time())
            loop.call_later(delay, self._post, short_id, float(reply_s), float(share))
        return web.json_response({"scheduled": len(posts)})

    def _post(self, short_id: str, reply_s: float, share: float) -> None:
        posted = time.time()
        self.sim.send_message(short_id, "Run the checkout test", reply_s=reply_s, stream_share=share)
        self.posted[short_id] = (posted, posted + reply_s)

    async def stats(self, request: web.Request) -> web.Response:
        log = self.log
        statuses = {str(k): v for k, v in log.statuses.items()}
        return web.json_response(
            {"gets": log.count, "first": log.first, "last": log.last, "statuses": statuses}
        )

    async def get_log(self, request: web.Request) -> web.Response:
        prefix = "chat_" + request.query.get("prefix", "")
        times = {k: v for k, v in self.log.times.items() if k.startswith(prefix)}
        return web.Response(body=_dumps({"times": times}), content_type="application/json")

    async def get_posted(self, request: web.Request) -> web.Response:
        return web.Response(body=_dumps({"posted": self.posted}), content_type="application/json")

    async def reset(self, request: web.Request) -> web.Response:
        self.log = GetLog()
        self.sim.on_request = self.log.add
        return web.json_response({"reset": True})


async def serve(token: str, loop_name: str) -> None:
    """Serve the simulator and its admin API until SIGTERM or SIGINT."""
    sim = Simulator(SimConfig(token=token, seed=1, record_requests=False), clock=time.time)
    admin = Admin(sim)
    api_url = await sim.start("127.0.0.1", 0, fast=True)
    runner = web.AppRunner(admin.routes(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    admin_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"api": api_url, "admin": admin_url, "loop": loop_name}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description="the benchmark's simulator process")
    parser.add_argument("--token", required=True)
    parser.add_argument("--asyncio", action="store_true", help="the default event loop, not uvloop")
    args = parser.parse_args()
    run: Callable[[Awaitable[None]], None] = asyncio.run  # type: ignore[assignment]
    name = "asyncio"
    if not args.asyncio:
        with contextlib.suppress(ImportError):
            import uvloop  # noqa: PLC0415 - optional (the `fast` extra)

            run, name = uvloop.run, "uvloop"  # type: ignore[assignment]
    run(serve(args.token, name))
    return 0


# --------------------------------------------------------------------------- driver side


class SimProcess:
    """The driver's handle on a running ``bench.simproc``: start, admin calls, stop."""

    def __init__(self, proc: asyncio.subprocess.Process, api: str, admin: str, token: str) -> None:
        self.proc = proc
        self.api = api
        self.admin = admin
        self.token = token
        self.pid = proc.pid
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))

    @classmethod
    async def start(cls, token: str) -> SimProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.simproc", "--token", token,
            cwd=REPO, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 30.0)
            ready = json.loads(line)
        except (TimeoutError, ValueError):
            await stop_process(proc, 2.0)
            raise BenchError("the simulator process did not start") from None
        return cls(proc, ready["api"], ready["admin"], token)

    async def _call(self, method: str, path: str, body: object = None) -> Any:
        async with self._session.request(method, self.admin + path, json=body) as resp:
            if resp.status != 200:
                raise BenchError(f"simulator admin {method} {path}: {resp.status} {await resp.text()}")
            return await resp.json(loads=json.loads)

    async def create(self, prefix: str, count: int, kind: str, reply_s: float = 3600.0) -> list[str]:
        """Create a group of conversations (see ``POST /chats``); their ids."""
        await self._call(
            "POST", "/chats", {"prefix": prefix, "count": count, "kind": kind, "reply_s": reply_s}
        )
        return chat_ids(prefix, count)

    async def post(self, posts: list[tuple[str, float, float, float]]) -> None:
        """Schedule (id, wall time, reply_s, stream_share) posts."""
        await self._call("POST", "/posts", {"posts": posts})

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/stats")
        return result

    async def gets(self) -> int:
        return int((await self.stats())["gets"])

    async def log(self, prefix: str = "") -> dict[str, list[float]]:
        """GET times per conversation (of ids ``chat_<prefix>...``)."""
        result: dict[str, list[float]] = (await self._call("GET", f"/log?prefix={prefix}"))["times"]
        return result

    async def posted(self) -> dict[str, tuple[float, float]]:
        """(posted at, reply ends at) per conversation that got a scheduled post."""
        raw = (await self._call("GET", "/posted"))["posted"]
        return {k: (float(v[0]), float(v[1])) for k, v in raw.items()}

    async def reset(self) -> None:
        await self._call("POST", "/reset")

    async def first_get_after(self, since: float, alive: Callable[[], str | None], within_s: float) -> float:
        """Wait for the first GET (the log must have been reset before ``since``); its wall
        time. ``alive()`` names why the poller died, if it did. BenchError on timeout."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            stats = await self.stats()
            if stats["first"] is not None and stats["first"] >= since:
                return float(stats["first"])
            dead = alive()
            if dead is not None:
                raise BenchError(dead)
            await asyncio.sleep(0.02)
        raise BenchError(f"no GET reached the simulator within {within_s:.0f} s")

    async def close(self) -> None:
        await self._session.close()
        await stop_process(self.proc, 5.0)


if __name__ == "__main__":
    sys.exit(main())
