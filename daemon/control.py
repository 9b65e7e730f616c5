"""The control API of `qawatch run`: runtime watches, health, readiness and metrics.

Listens on ``control.listen`` (loopback by default). With ``control.token`` set, every
endpoint but ``/healthz`` wants ``Authorization: Bearer <token>``, compared in constant time.

Whatever a client sends (bytes that are not UTF-8, a header line over aiohttp's limit, a body
nested too deeply for the JSON parser) is answered with a 4xx and at most one JSON log line:
never a traceback, which would break the log stream (and may hold what the client sent).
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon.errors import ConfigError, ListenError, NotFoundError, QawatchError, RejectedError
from daemon.logs import get_logger
from daemon.settings import bad_id_message, is_short_id, split_listen
from daemon.store import WatchRow

if TYPE_CHECKING:
    from daemon.app import App

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the largest request body read (a PUT body is ``{"backfill": "none"}``); larger is a 413
MAX_BODY_BYTES = 64 * 1024
#: how much of a client's bad request is quoted in the log line
_QUOTE_CHARS = 200


class _OneLineHandler(logging.Handler):
    """aiohttp's server log (a request it could not parse, a client gone mid-answer) as one
    structlog line without the traceback, so the log stream stays JSON. Only the error's
    kind is named: aiohttp's message quotes the request's bytes, which may hold a credential."""

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        get_logger().warning(
            "control API: bad request",
            detail=record.getMessage()[:_QUOTE_CHARS],
            error=type(exc).__name__ if exc is not None else None,
            status=getattr(exc, "code", None),
        )


def _server_logger() -> logging.Logger:
    """The logger handed to aiohttp's request handler: never stdlib's last-resort stderr."""
    logger = logging.getLogger("qawatch.control.http")
    if not any(isinstance(handler, _OneLineHandler) for handler in logger.handlers):
        logger.addHandler(_OneLineHandler())
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # aiohttp's debug lines (only in asyncio debug mode) are noise
    return logger


def watch_json(row: WatchRow) -> dict[str, Any]:
    data = row._asdict()
    data.pop("detector")
    # the store keeps 0/1; the API has always said true/false
    data["in_config"], data["in_runtime"] = bool(row.in_config), bool(row.in_runtime)
    data["source"] = row.source
    return data


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


#: bind errors that can clear by themselves: the previous instance still holds the port; a
#: supervisor's restart can fix it. An address not on this host is far more often a typo than an
#: interface still coming up: a configuration error (exit 2), not a restart every 5 s forever.
TRANSIENT_BIND_ERRNOS = frozenset({errno.EADDRINUSE})


def listen_failure(listen: str, exc: OSError) -> QawatchError:
    """The one-line error for a failure to listen on ``listen`` (exit 1 if a restart can fix it)."""
    # asyncio rewords bind errors ("error while attempting to bind on address ..."): the errno's
    # own text; a host name that does not resolve (gaierror, a negative code) keeps its message
    code = exc.errno
    reason = os.strerror(code) if code is not None and code in errno.errorcode else (exc.strerror or str(exc))
    message = f"control.listen: cannot listen on {listen}: {reason}"
    if exc.errno in TRANSIENT_BIND_ERRNOS:
        return ListenError(message)
    return ConfigError(f"config error: {message}")


class ControlServer:
    def __init__(self, app: App, listen: str, token: str | None) -> None:
        self.app = app
        self.host, self.port = split_listen(listen)
        self._token = token
        self._runner: web.AppRunner | None = None
        self.log = get_logger()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A bug in a handler is a 500 and one log line, never a traceback."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.log.error(
                "control API: internal error",
                method=request.method,
                path=request.path[:_QUOTE_CHARS],
                error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:_QUOTE_CHARS],
            )
            return _error(500, "internal error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path != "/healthz":
            # the header as the client sent it: aiohttp keeps bytes that are not UTF-8 as
            # surrogates, which a plain .encode() refuses
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {self._token}".encode()):
                return _error(401, "missing or wrong bearer token")
        return await handler(request)

    def build(self) -> web.Application:
        web_app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY_BYTES)
        web_app.router.add_get("/healthz", self.healthz)
        web_app.router.add_get("/readyz", self.readyz)
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/v1/watches", self.list_watches)
        web_app.router.add_get("/v1/watches/{id}", self.get_watch)
        web_app.router.add_put("/v1/watches/{id}", self.put_watch)
        web_app.router.add_delete("/v1/watches/{id}", self.delete_watch)
        return web_app

    async def start(self) -> None:
        """Listen on ``control.listen``; :class:`ListenError` (exit 1) when the port is taken or the
        address is not on this host, :class:`ConfigError` (exit 2) when listening fails otherwise."""
        self._runner = web.AppRunner(
            self.build(), access_log=None, shutdown_timeout=1.0, logger=_server_logger()
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise listen_failure(f"{self.host}:{self.port}", exc) from None
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
        if not is_short_id(short_id):
            return _error(400, bad_id_message(short_id))
        return short_id

    async def get_watch(self, request: web.Request) -> web.Response:
        short_id = self._id(request)
        if isinstance(short_id, web.Response):
            return short_id
        row = await self.app.watch_row(short_id)
        if row is None:
            return _error(404, f"{short_id} is not watched")
        return web.json_response(watch_json(row))

    async def _backfill(self, request: web.Request) -> str | web.Response:
        """A PUT body's ``backfill`` (default ``watch.backfill``), or the 400 to answer."""
        backfill = self.app.settings.watch.backfill
        if not request.can_read_body:
            return backfill
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON")
        except RecursionError:
            return _error(400, "the body is nested too deeply")
        if not isinstance(body, dict) or set(body) - {"backfill"}:
            return _error(400, 'the body may only hold {"backfill": "latest" | "none"}')
        backfill = body.get("backfill", backfill)
        if backfill not in ("latest", "none"):
            return _error(400, f"backfill: {backfill!r} is not 'latest' or 'none'")
        return str(backfill)

    async def put_watch(self, request: web.Request) -> web.Response:
        short_id = self._id(request)
        if isinstance(short_id, web.Response):
            return short_id
        backfill = await self._backfill(request)
        if isinstance(backfill, web.Response):
            return backfill
        existing = await self.app.watch_row(short_id)
        if existing is None or not existing.active:
            try:
                await self.app.check_conversation(short_id)
            except NotFoundError:
                return _error(404, f"{short_id}: the API has no such conversation (404)")
            except RejectedError as exc:
                return _error(400, f"{short_id}: {exc}")
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
