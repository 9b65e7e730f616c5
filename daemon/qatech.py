"""QA.tech chat API: an aiohttp client that classifies every answer.

The client does one thing per call and turns every outcome into either a parsed
:class:`~daemon.models.Conversation` or one of the :mod:`daemon.errors` classes; waiting
longer than a short in-call retry is the scheduler's job. The response models are in
:mod:`daemon.models`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import backoff
from yarl import URL

from daemon import __version__
from daemon.errors import (
    AuthError,
    BadResponseError,
    ConnectError,
    NotFoundError,
    RateLimitedError,
    RejectedError,
    TransientError,
    UpstreamError,
)
from daemon.httputil import excerpt, parse_retry_after
from daemon.models import Conversation, conversation_of, parse_conversation

USER_AGENT = f"qawatch/{__version__}"
#: how much of an error answer's body is read (for its message)
ERROR_BODY_BYTES = 64 * 1024
#: an id made only of these needs no quoting in a path (every valid short id: the fast path)
_PATH_SAFE = re.compile(r"[A-Za-z0-9_-]+").fullmatch


def _path_segment(short_id: str) -> str:
    return short_id if _PATH_SAFE(short_id) else quote(short_id, safe="")


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return excerpt(body["message"])
    except (ValueError, RecursionError):  # not JSON, or nested deeper than any real error body
        pass
    return excerpt(raw) or "no message"


def classify(status: int, raw: bytes, headers: Mapping[str, str], what: str) -> UpstreamError:
    """Map a non-2xx answer to the design's error table."""
    message = _error_message(raw)
    if status in (401, 403):
        return AuthError(f"the API refused the token ({status}: {message})", status=status)
    if status == 404:
        return NotFoundError(f"{what}: not found (404)", status=status)
    if status == 400:
        return RejectedError(f"{what}: rejected by the API (400: {message})", status=status)
    retry_after = parse_retry_after(headers.get("Retry-After"), time.time())
    if status == 429:
        hint = f", retry after {retry_after:g}s" if retry_after is not None else ""
        return RateLimitedError(
            f"rate limited by the API (429{hint})",
            status=status,
            retry_after=retry_after,
        )
    return TransientError(f"{what}: API answered {status}: {message}", status=status, retry_after=retry_after)


class QATechClient:
    """One pooled :class:`aiohttp.ClientSession` for every call to the QA.tech API."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 32,
        connect_retries: int = 2,
        max_response_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # requests build their URL from the parsed base: URL.build(encoded=True) is about a
        # third of the cost of parsing the whole string again for every poll
        base = URL(self.base_url, encoded=True)  # its path exactly as configured (%3B stays)
        self._scheme, self._authority = base.scheme, base.raw_authority
        self._prefix = base.raw_path.rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._connect_retries = connect_retries
        self._max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the token
        return f"QATechClient({self.base_url!r})"

    async def open(self) -> QATechClient:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "User-Agent": USER_AGENT,
                    "Accept": "application/json",
                },
                raise_for_status=False,
            )
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> QATechClient:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def get_conversation(self, short_id: str, limit: int = 20) -> Conversation:
        """``GET /v1/chat/{id}?limit=N`` parsed, or an :class:`UpstreamError`."""
        return conversation_of(short_id, await self.get_conversation_bytes(short_id, limit))

    async def get_conversation_bytes(self, short_id: str, limit: int = 20) -> bytes:
        """The body of ``GET /v1/chat/{id}?limit=N`` (a 2xx within the size bound), not yet
        parsed: the poller skips parsing an answer identical to the last one."""
        return await self._request(
            "GET", f"/v1/chat/{_path_segment(short_id)}", short_id, query=f"limit={int(limit)}"
        )

    async def create_chat(self, message: str) -> Conversation:
        """``POST /v1/chat``: start a conversation (answers 202 with ``messages: []``)."""
        raw = await self._request("POST", "/v1/chat", "new chat", json_body={"message": message})
        return parse_conversation(raw)

    async def send_message(self, short_id: str, message: str) -> None:
        """``POST /v1/chat/{id}``: a follow-up message (answers 202)."""
        await self._request(
            "POST", f"/v1/chat/{_path_segment(short_id)}", short_id, json_body={"message": message}
        )

    async def _read_bounded(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The body, read in chunks; one larger than ``max_response_bytes`` is a bad response
        (and is not read further). Of an error answer only the start is read: its status is
        what counts, the body only gives the message."""
        if not 200 <= resp.status < 300:
            return await resp.content.read(ERROR_BODY_BYTES)
        cap = self._max_response_bytes
        length = resp.content_length
        if length is not None and length > cap:
            raise BadResponseError(
                f"{what}: the answer is larger than api.max_response_bytes ({cap} bytes)", excerpt=""
            )
        if length is not None:  # the common case: one read of a size already checked
            return await resp.read()
        body = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > cap:
                raise BadResponseError(
                    f"{what}: the answer is larger than api.max_response_bytes ({cap} bytes)",
                    excerpt=excerpt(bytes(body[:512])),
                )
        return bytes(body)

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: str = "",
        json_body: dict[str, Any] | None = None,
    ) -> bytes:
        """One call; a GET that cannot connect is tried again up to ``connect_retries`` times
        (expo backoff with full jitter). A POST is not idempotent: a follow-up is never sent
        twice by a retry."""
        if self._session is None:
            raise RuntimeError("QATechClient.open() was not called")
        # encoded=True: the path is quoted above and the query is digits; no second parse
        url = URL.build(
            scheme=self._scheme,
            authority=self._authority,
            path=self._prefix + path,
            query_string=query,
            encoded=True,
        )
        retries = self._connect_retries if method == "GET" else 0
        delays = None
        for attempt in range(retries + 1):
            try:
                status, raw, headers = await self._attempt(method, url, what, json_body)
                break
            except ConnectError:
                if attempt == retries:
                    raise
                if delays is None:  # made on the first failure only: not a cost of every poll
                    delays = backoff.expo(factor=0.2, max_value=1.0)
                    next(delays)  # backoff's generators yield once before the first value
                await asyncio.sleep(backoff.full_jitter(next(delays)))
        if 200 <= status < 300:
            return raw
        raise classify(status, raw, headers, what)

    async def _attempt(
        self, method: str, url: URL, what: str, json_body: dict[str, Any] | None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        assert self._session is not None
        try:
            async with self._session.request(method, url, json=json_body, allow_redirects=False) as resp:
                return resp.status, await self._read_bounded(resp, what), resp.headers
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # ServerTimeoutError is a ClientConnectionError: a timed-out read lands here too
            raise ConnectError(f"{what}: cannot reach {self.base_url}: {_reason(exc)}") from None
        except TimeoutError:
            raise ConnectError(
                f"{what}: no answer from {self.base_url} within {self._timeout.total:g}s"
            ) from None
        except aiohttp.ClientResponseError as exc:
            # a malformed answer (bad status line, oversized headers): the server's fault
            raise TransientError(
                f"{what}: malformed HTTP answer from {self.base_url}: {exc.message}", status=exc.status
            ) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
