"""The control API of `qawatch run`: runtime watches, health, readiness and metrics.

Listens on ``control.listen`` (loopback by default). With ``control.token`` set, every
endpoint but ``/healthz`` wants ``Authorization: Bearer <token>``, compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.logs import get_logger
from daemon.settings import SHORT_ID_RE, split_listen
from daemon.store import WatchRow

if TYPE_CHECKING:
    from daemon.app import App

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def watch_json(row: WatchRow) -> dict[str, Any]:
    data = asdict(row)
    data.pop("detector")
    data["source"] = row.source
    return data


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class ControlServer:
    def __init__(self, app: App, listen: str, token: str | None) -> None:
        self.app = app
        self.host, self.port = split_listen(listen)
        self._token = token
        self._runner: web.AppRunner | None = None
        self.log = get_logger()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path != "/healthz":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
                return _error(401, "missing or wrong bearer token")
        return await handler(request)

    def build(self) -> web.Application:
        web_app = web.Application(middlewares=[self._auth])
        web_app.router.add_get("/healthz", self.healthz)
        web_app.router.add_get("/readyz", self.readyz)
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/v1/watches", self.list_watches)
        web_app.router.add_get("/v1/watches/{id}", self.get_watch)
        web_app.router.add_put("/v1/watches/{id}", self.put_watch)
        web_app.router.add_delete("/v1/watches/{id}", self.delete_watch)
        return web_app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.build(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.log.info("control API listening", listen=f"{self.host}:{self.port}")

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful with port 0)."""
        for site in self._runner.sites if self._runner else []:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                return int(server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self.app.readiness_problems()
        if problems:
            return web.json_response({"ready": False, "problems": problems}, status=503)
        return web.json_response({"ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        await self.app.refresh_gauges()
        return web.Response(body=self.app.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_watches(self, request: web.Request) -> web.Response:
        rows = await self.app.watch_rows()
        return web.json_response({"watches": [watch_json(row) for row in rows]})

    def _id(self, request: web.Request) -> str | web.Response:
        short_id = request.match_info["id"]
        if not SHORT_ID_RE.match(short_id):
            return _error(400, f"{short_id!r} is not a QA.tech conversation id (like chat_abc)")
        return short_id

    async def get_watch(self, request: web.Request) -> web.Response:
        short_id = self._id(request)
        if isinstance(short_id, web.Response):
            return short_id
        row = await self.app.watch_row(short_id)
        if row is None:
            return _error(404, f"{short_id} is not watched")
        return web.json_response(watch_json(row))

    async def put_watch(self, request: web.Request) -> web.Response:
        short_id = self._id(request)
        if isinstance(short_id, web.Response):
            return short_id
        backfill = self.app.settings.watch.backfill
        if request.can_read_body:
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                return _error(400, "the body is not JSON")
            if not isinstance(body, dict) or set(body) - {"backfill"}:
                return _error(400, 'the body may only hold {"backfill": "latest" | "none"}')
            backfill = body.get("backfill", backfill)
            if backfill not in ("latest", "none"):
                return _error(400, f"backfill: {backfill!r} is not 'latest' or 'none'")
        row, created = await self.app.add_watch(short_id, backfill)
        return web.json_response(watch_json(row), status=201 if created else 200)

    async def delete_watch(self, request: web.Request) -> web.Response:
        short_id = self._id(request)
        if isinstance(short_id, web.Response):
            return short_id
        row = await self.app.watch_row(short_id)
        if row is None or not row.in_runtime:
            if row is not None and row.in_config:
                return _error(409, f"{short_id} is watched from the configuration; remove it there")
            return _error(404, f"{short_id} was not added at runtime")
        row = await self.app.remove_watch(short_id)
        return web.json_response(watch_json(row))
