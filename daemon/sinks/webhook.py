"""The webhook sink: Standard Webhooks (standardwebhooks.com) signed POSTs.

Each attempt POSTs the event's exact JSON bytes with ``webhook-id`` (the event id, the same
on every attempt), ``webhook-timestamp`` (this attempt's Unix seconds) and, when secrets are
set, ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`` (one signature per
secret, space-separated, for rotation). The answer decides what the outbox does next:
2xx delivered; 410 disables the sink (its events stay pending); every other answer (3xx, as
redirects are not followed, any 4xx, 5xx), connection error and timeout is retried on the
schedule, as Svix does: a receiver answering 404 or 400 during its own deploy must not lose
events. The event is dead-lettered only once the schedule is spent (or ``max_age_s`` passed).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from daemon import __version__, logs
from daemon.errors import ConfigError, SinkDisabledError, SinkError
from daemon.httputil import excerpt, parse_retry_after
from daemon.scheduler import RETRY_AFTER_CAP_S
from daemon.settings import DEFAULT_WEBHOOK_SCHEDULE_S, mask_url
from daemon.signing import secret_key, signature_header
from daemon.sinks.base import BaseSink


def read_secret_file(path: Path, key: str) -> list[str]:
    """Secrets from a file: one per line (several for rotation), ``#`` comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config error: {key}: cannot read {path}: {reason}") from None
    secrets = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    secrets = [line for line in secrets if line]
    if not secrets:
        raise ConfigError(f"config error: {key}: {path} holds no secret")
    for secret in secrets:
        try:
            secret_key(secret)
        except ValueError as exc:
            raise ConfigError(f"config error: {key}: a secret in {path} {exc}") from None
    return secrets


class WebhookSink(BaseSink):
    remote = True

    def __init__(
        self,
        name: str,
        url: str,
        *,
        secrets: Sequence[str] = (),
        secret_file: Path | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 15.0,
        retry_schedule_s: Sequence[float] = DEFAULT_WEBHOOK_SCHEDULE_S,
        max_age_s: float | None = None,
        max_concurrency: int = 4,
        events: frozenset[str] | None = None,
        key: str = "sinks",
    ) -> None:
        super().__init__(name, events)
        self.url = url
        self.max_concurrency = max_concurrency
        self.retry_schedule_s = tuple(retry_schedule_s)
        self.max_age_s = max_age_s
        self._secrets = list(secrets)
        self._secret_file = secret_file
        self._keys: list[bytes] = []
        self._key = key
        self._headers = dict(headers or {})
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never show the secrets
        return f"WebhookSink({self.name!r}, {mask_url(self.url)!r})"

    async def open(self) -> None:
        secrets = list(self._secrets)
        if self._secret_file is not None:
            secrets += read_secret_file(self._secret_file, f"{self._key}.secret_file")
        self._keys = [secret_key(secret) for secret in secrets]
        for secret in secrets:  # scrubbed from every log line, should one ever carry it
            logs.register_secret(secret)
            logs.register_secret(secret.removeprefix("whsec_"))
        for _, value in parse_qsl(urlsplit(self.url).query):  # query values are often tokens
            logs.register_secret(value)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_concurrency, keepalive_timeout=30),
            timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def retry_delay(self, attempts: int, rng: random.Random) -> float | None:
        """Delay after the ``attempts``-th failed attempt, ±10%; None once the schedule is spent."""
        if attempts > len(self.retry_schedule_s):
            return None
        return self.retry_schedule_s[attempts - 1] * rng.uniform(0.9, 1.1)

    def headers_for(self, event_id: str, body: str, timestamp: int) -> dict[str, str]:
        headers = {
            **self._headers,
            "content-type": "application/json",
            "user-agent": f"qawatch/{__version__}",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
        }
        if self._keys:
            headers["webhook-signature"] = signature_header(self._keys, event_id, timestamp, body)
        return headers

    def _reason(self, exc: BaseException) -> str:
        """Why an attempt failed, without the URL (its path or query may be a credential)."""
        if isinstance(exc, TimeoutError):
            return "timed out"
        if isinstance(exc, aiohttp.ClientResponseError):
            return f"malformed answer: {exc.status}, {exc.message}"
        text = (str(exc) or type(exc).__name__).replace(self.url, mask_url(self.url))
        return text.splitlines()[0]

    async def send(self, event_id: str, body: str) -> None:
        if self._session is None:
            raise RuntimeError("WebhookSink.open() was not called")
        timestamp = int(time.time())
        headers = self.headers_for(event_id, body, timestamp)
        try:
            async with self._session.post(
                self.url, data=body.encode(), headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                answer = excerpt(await resp.content.read(2048))
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SinkError(f"{self.name}: {self._reason(exc)}") from None
        if 200 <= status < 300:
            return
        what = f"{self.name}: HTTP {status}" + (f": {answer}" if answer else "")
        if status == 410:
            raise SinkDisabledError(what)
        capped = min(retry_after, RETRY_AFTER_CAP_S) if retry_after is not None else None
        raise SinkError(what, retry_after=capped)
