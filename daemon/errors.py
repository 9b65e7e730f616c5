"""The one exception tree of qawatch.

Everything a user can cause is a :class:`QawatchError` with an exit code and a one-line
message; the CLI prints the message and exits with the code, never a traceback.
"""

from __future__ import annotations


class ExitCode:
    OK = 0
    REPLY_FAILED = 1
    USAGE = 2
    TIMEOUT = 3
    API = 4


class QawatchError(Exception):
    """Root of qawatch's errors; ``str(err)`` is a one-line message fit for stderr."""

    exit_code = ExitCode.USAGE


class ConfigError(QawatchError):
    """Bad configuration, flag or input: exit 2."""


class ListenError(QawatchError):
    """An address to listen on is held by another process or not (yet) on this host: exit 1.

    Not a :class:`ConfigError`: the port is often still held by the previous instance, and exit 2
    would stop a supervisor's restarts (the systemd unit has ``RestartPreventExitStatus=2``)."""

    exit_code = ExitCode.REPLY_FAILED  # 1, the general failure code; anything but 2 gets restarts


class UpstreamError(QawatchError):
    """Something went wrong talking to QA.tech."""

    exit_code = ExitCode.API

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(UpstreamError):
    """Worth retrying later: 408, 5xx, timeouts, connection errors, malformed bodies."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ConnectError(TransientError):
    """The API could not be reached (connection refused, DNS, reset, timeout)."""


class BadResponseError(TransientError):
    """A 200 whose body is not the documented shape (or not JSON)."""

    def __init__(self, message: str, *, excerpt: str) -> None:
        super().__init__(message, status=200)
        self.excerpt = excerpt


class RateLimitedError(TransientError):
    """429: every conversation pauses until ``retry_after`` (seconds) or a backoff."""


class PermanentError(UpstreamError):
    """Retrying the same request will not help."""


class AuthError(PermanentError):
    """401/403: the token is refused."""


class NotFoundError(PermanentError):
    """404: the conversation is gone."""


class RejectedError(PermanentError):
    """400: the API rejected the request (for a watch: the id)."""


class SinkError(QawatchError):
    """A sink could not take an event; ``retryable`` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class SinkDisabledError(SinkError):
    """The receiver said the endpoint is gone (410): stop sending until re-enabled."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
