"""`qawatch add|remove|list|health`: talk to a running daemon's control API."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp

from daemon.errors import ConfigError, ExitCode, QawatchError
from daemon.events import shown_time
from daemon.logs import get_logger
from daemon.settings import Settings, bad_id_message, is_short_id, split_listen

TIMEOUT_S = 5.0


class ControlUnreachableError(QawatchError):
    exit_code = ExitCode.API


def control_url(settings: Settings) -> str:
    if settings.control.listen is None:
        raise ConfigError("config error: control.listen: the control API is disabled (null)")
    host, port = split_listen(settings.control.listen)
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached through loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class ControlClient:
    def __init__(self, settings: Settings) -> None:
        self.base = control_url(settings)
        token = settings.control.token
        self._headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlClient:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S), headers=self._headers
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("use ControlClient as an async context manager")
        try:
            async with self._session.request(method, self.base + path, json=body) as resp:
                text = await resp.text()
                # --log-level debug: each call to the daemon and what it answered
                get_logger().debug("control API", method=method, path=path, status=resp.status)
                try:
                    return resp.status, json.loads(text) if text else {}
                except ValueError:
                    return resp.status, {"message": text[:200]}
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise ControlUnreachableError(
                f"qawatch: cannot reach the daemon's control API at {self.base}: {reason}"
            ) from None


def _check(ids: Sequence[str]) -> None:
    for short_id in ids:
        if not is_short_id(short_id):
            raise ConfigError(f"qawatch: {bad_id_message(short_id)}")


def _quoted(short_id: str) -> str:
    """``short_id`` as one path segment: a ``?``, ``#``, ``/`` or ``%`` in it stays part of it."""
    return quote(short_id, safe="")


def _refused(status: int, body: Any) -> QawatchError:
    message = body.get("message", "") if isinstance(body, dict) else ""
    error = QawatchError(f"qawatch: control API answered {status}: {message}")
    error.exit_code = ExitCode.USAGE if status in (400, 404, 409) else ExitCode.API
    return error


async def add(settings: Settings, ids: Sequence[str], backfill: str | None, out: TextIO) -> int:
    _check(ids)
    body = {"backfill": backfill} if backfill else None
    async with ControlClient(settings) as client:
        for short_id in ids:
            status, answer = await client.call("PUT", f"/v1/watches/{_quoted(short_id)}", body)
            if status == 404:  # the daemon asked the API: no such conversation
                error = _refused(status, answer)
                error.exit_code = ExitCode.API
                raise error
            if status not in (200, 201):
                raise _refused(status, answer)
            out.write(f"{'added' if status == 201 else 'already watched'}: {short_id}\n")
    return ExitCode.OK


async def remove(settings: Settings, ids: Sequence[str], out: TextIO) -> int:
    _check(ids)
    async with ControlClient(settings) as client:
        for short_id in ids:
            status, answer = await client.call("DELETE", f"/v1/watches/{_quoted(short_id)}")
            if status != 200:
                raise _refused(status, answer)
            still = answer.get("state") == "active"
            out.write(f"removed: {short_id}{' (still watched from the configuration)' if still else ''}\n")
    return ExitCode.OK


def format_watches(rows: Sequence[dict[str, Any]], now: float) -> str:
    """The watch set as a table; with a shared store (several replicas), a HOLDER column
    names the replica polling each watch."""
    shared = any(row.get("holder") for row in rows)
    header: tuple[str, ...] = ("ID", "STATE", "SOURCE", "LAST POLL", "LAST STATUS", "NEXT POLL", "ERRORS")
    if shared:
        header += ("HOLDER",)
    table = [header]
    for row in rows:
        state = row["state"] if row["state"] == "active" else f"ended ({row['reason']})"
        line: tuple[str, ...] = (
            row["short_id"],
            state,
            row["source"],
            shown_time(row["last_poll_at"], now),
            row["last_status"] or "-",
            shown_time(row["next_poll_at"], now) if row["state"] == "active" else "-",
            str(row["errors"]),
        )
        if shared:
            line += (row.get("holder") or "-",)
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    )


async def list_watches(settings: Settings, as_json: bool, out: TextIO, now: float) -> int:
    async with ControlClient(settings) as client:
        status, answer = await client.call("GET", "/v1/watches")
    if status != 200:
        raise _refused(status, answer)
    rows = answer["watches"]
    if as_json:
        out.write(json.dumps(rows, indent=2) + "\n")
    elif not rows:
        out.write("no watches\n")
    else:
        out.write(format_watches(rows, now) + "\n")
    return ExitCode.OK


async def health(settings: Settings, out: TextIO, err: TextIO) -> int:
    """Exit 0 when the daemon is ready, 1 otherwise (Docker's HEALTHCHECK convention)."""
    try:
        async with ControlClient(settings) as client:
            status, answer = await client.call("GET", "/readyz")
    except ControlUnreachableError as exc:
        err.write(f"{exc}\n")
        return 1
    if status == 200:
        out.write("ready\n")
        return ExitCode.OK
    problems = answer.get("problems") or [answer.get("message", f"HTTP {status}")]
    err.write("qawatch: not ready: " + "; ".join(str(p) for p in problems) + "\n")
    return 1
