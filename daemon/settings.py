"""Settings: one pydantic-settings model, flags > environment > YAML file > defaults.

Building a :class:`Settings` does no I/O beyond reading the YAML file it is given; secrets
that live in files (``api.token_file``) are read by :func:`resolve_token` when a command
starts, so that ``check-config`` can validate without touching them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from daemon.errors import ConfigError
from daemon.scheduler import DEFAULT_WAITING_INTERVAL_S
from daemon.signing import secret_key

#: the longest short id accepted (QA.tech's are a few dozen characters); a longer one is a
#: mistake, and would make every request line, log line and state row as long
SHORT_ID_MAX_LEN = 200
#: QA.tech's short id pattern (``^chat(-.+_.+|_.+)$``), matched whole (``\Z``, since ``$``
#: also matches before a final newline), without whitespace, control characters or ``/``
#: since an id is a URL path segment, and at most :data:`SHORT_ID_MAX_LEN` characters.
#: Prefer :func:`is_short_id`.
_ID_CHAR = r"[^\s/\x00-\x1f\x7f-\x9f\ud800-\udfff]"  # surrogates: not UTF-8, not storable
SHORT_ID_RE = re.compile(
    rf"\A(?={_ID_CHAR}{{1,{SHORT_ID_MAX_LEN}}}\Z)chat(-{_ID_CHAR}+_{_ID_CHAR}+|_{_ID_CHAR}+)\Z"
)
ENV_PREFIX = "QAWATCH_"
CONFIG_ENV = "QAWATCH_CONFIG"
EVENT_TYPES = (
    "chat.reply.completed",
    "chat.reply.failed",
    "chat.reply.cancelled",
    "chat.watch.ended",
)
EventType = Literal["chat.reply.completed", "chat.reply.failed", "chat.reply.cancelled", "chat.watch.ended"]


def is_short_id(value: str) -> bool:
    """Whether ``value`` is a whole QA.tech short id (see :data:`SHORT_ID_RE`), with no
    invisible character in it (U+200B, U+FEFF, a soft hyphen...: another id that looks the same)."""
    return (
        len(value) <= SHORT_ID_MAX_LEN
        and SHORT_ID_RE.fullmatch(value) is not None
        # the pattern already refuses ASCII whitespace and controls: only non-ASCII needs a look
        and (value.isascii() or not any(unicodedata.category(char) in _INVISIBLE for char in value))
    )


#: Unicode categories of characters that print as nothing: format, separators, unassigned
_INVISIBLE = frozenset({"Cf", "Cn", "Co", "Zl", "Zp", "Zs"})


def shown_id(value: str) -> str:
    """``value`` quoted for a one-line message: control characters escaped, and cut when it is
    longer than any id (a 100,000-character value would make a 100,000-character line)."""
    if len(value) <= SHORT_ID_MAX_LEN:
        return repr(value)
    return f"{value[:40]!r}... ({len(value)} characters)"


def bad_id_message(value: str) -> str:
    """Why ``value`` is refused as a short id, naming it on one line."""
    why = f"longer than {SHORT_ID_MAX_LEN} characters" if len(value) > SHORT_ID_MAX_LEN else "like chat_abc"
    return f"{shown_id(value)} is not a QA.tech conversation id ({why})"


def check_short_id(value: str) -> str:
    if not is_short_id(value):
        raise ValueError(bad_id_message(value))
    return value


ShortId = Annotated[str, AfterValidator(check_short_id)]


def check_path(value: Path) -> Path:
    """No control characters: a NUL makes every file call fail (``embedded null byte``) and the
    others are typos (a pasted newline) that name a file no one meant."""
    for char in str(value):
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"the path holds a control character (U+{ord(char):04X})")
    return value


#: a file or folder path a command opens: checked here, so that check-config catches it too
SafePath = Annotated[Path, AfterValidator(check_path)]


def _split_ids(value: Any) -> Any:
    """Accept a list, a JSON list, or a comma/space separated string (handy in env vars)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part for part in re.split(r"[\s,]+", text) if part]
    return value


#: an API base URL: scheme, authority and an optional path (no query or fragment)
_BASE_URL_RE = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
#: a webhook URL: scheme and authority, then anything without whitespace
_WEBHOOK_URL_RE = re.compile(r"^https?://[^\s/?#]+([/?#]\S*)?$")


_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def mask_url(url: str) -> str:
    """``url`` fit to print: the userinfo password (``https://user:***@host``; a user alone is
    often a token: ``***@host``) and every query value (``?key=***``) masked."""

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return match.group(1) + (f"{user}:***@" if colon else "***@")

    masked = _USERINFO_RE.sub(userinfo, url, count=1)
    head, question, rest = masked.partition("?")
    if not question:
        return masked
    query, hash_, fragment = rest.partition("#")
    items = []
    for item in query.split("&"):
        key, equals, value = item.partition("=")
        items.append(f"{key}=***" if equals and value else item if equals or not item else "***")
    return f"{head}?{'&'.join(items)}{hash_}{fragment}"


def check_http_url(value: str, pattern: re.Pattern[str]) -> str:
    """``value`` if it matches ``pattern`` and has a host and a port in 1-65535; else ValueError
    (whose message shows the URL masked)."""
    shown = mask_url(value)
    if not pattern.match(value):
        raise ValueError(f"{shown!r} is not an http(s) URL")
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed "[::1"
        raise ValueError(f"{shown!r} has no valid host") from None
    if not host:
        raise ValueError(f"{shown!r} has no host")
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{shown!r}: the port must be a number from 1 to 65535")
    from yarl import URL  # noqa: PLC0415 - the HTTP side's parser, loaded only to check a URL

    for encoded in (True, False):  # as the client and aiohttp will parse it (a backslash or
        try:  # text after "[::1]" passes urlsplit)
            URL(value, encoded=encoded)
        except ValueError:
            raise ValueError(f"{shown!r} is not a valid URL") from None
    return value


def url_password(url: str) -> str | None:
    """The secret part of a URL's userinfo (the password, else a lone user), if any."""
    match = _USERINFO_RE.match(url)
    if match is None:
        return None
    user, colon, password = match.group(2).partition(":")
    return password if colon else user


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(Section):
    base_url: str = "https://api.qa.tech"
    token: SecretStr | None = None
    token_file: SafePath | None = None
    timeout_s: float = Field(10.0, gt=0, le=300)
    max_concurrency: int = Field(32, ge=1, le=1024)
    rate_limit_per_s: float = Field(20.0, gt=0, le=10_000)
    message_limit: int = Field(20, ge=1, le=100)
    #: a larger answer is a bad response (read in chunks, never held whole)
    max_response_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_http_url(value, _BASE_URL_RE)
        if url_password(value) is not None:  # aiohttp refuses them next to the Bearer token
            raise ValueError(
                f"{mask_url(value)!r}: credentials in the URL cannot be used; the token goes in api.token"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set api.token or api.token_file, not both")
        return self


class PollSettings(Section):
    active_interval_s: float = Field(2.0, gt=0, le=3600)
    #: while the reply is not about to finish (none yet, or INITIATED); never below the active
    #: interval nor above the idle one; null: the active interval
    waiting_interval_s: float | None = Field(DEFAULT_WAITING_INTERVAL_S, gt=0, le=3600)
    idle_interval_s: float = Field(60.0, gt=0, le=86400)
    jitter: float = Field(0.1, ge=0, lt=1)
    error_backoff_max_s: float = Field(30.0, gt=0, le=86400)

    @field_validator("waiting_interval_s", mode="before")
    @classmethod
    def _same_as_active(cls, value: Any) -> Any:
        # in an environment variable, "null", "none" or "" mean null (the active interval)
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
            return None
        return value

    @model_validator(mode="after")
    def _ordered(self) -> PollSettings:
        if self.idle_interval_s < self.active_interval_s:
            raise ValueError("poll.idle_interval_s must be >= poll.active_interval_s")
        return self


class WatchSettings(Section):
    ids: Annotated[list[ShortId], NoDecode, BeforeValidator(_split_ids)] = Field(default_factory=list)
    file: SafePath | None = None
    backfill: Literal["latest", "none"] = "latest"
    expire_after_s: float | None = Field(86400.0, gt=0)


class StateSettings(Section):
    path: SafePath = Path("./qawatch-state.db")
    #: ``postgresql://user@host:5432/db``: a store shared by several replicas, instead of
    #: ``path`` (the password in the URL, or from libpq's PGPASSWORD / ``?passfile=``)
    url: str | None = Field(None, max_length=2048)
    #: with ``url``: a replica's claim on its watches and deliveries lapses after this long
    #: without renewal (renewed every third of it)
    lease_ttl_s: float = Field(15.0, ge=2, le=3600)
    #: forget the text of delivered events (and their delivery rows) after this many days;
    #: their ids are kept so no reply is reported twice. null keeps everything.
    retention_days: float | None = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.partition("://")[0].lower()
        if scheme not in ("postgresql", "postgres") or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must be a postgresql:// URL, e.g. postgresql://qawatch@db.example.com/qawatch")
        return value


class SinkBase(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    events: list[EventType] | None = None


class StdoutSinkSettings(SinkBase):
    type: Literal["stdout"]


class FileSinkSettings(SinkBase):
    type: Literal["file"]
    path: SafePath
    fsync: bool = True


#: webhook retries after the first attempt (Standard Webhooks' schedule, less "immediately")
DEFAULT_WEBHOOK_SCHEDULE_S = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
_RESERVED_HEADERS = ("content-type", "content-length", "host", "user-agent")


def _check_secret(secret: SecretStr) -> SecretStr:
    try:
        secret_key(secret.get_secret_value())
    except ValueError as exc:
        raise ValueError(f"the secret {exc}") from None
    return secret


WebhookSecret = Annotated[SecretStr, AfterValidator(_check_secret)]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | SecretStr) else value


class WebhookSinkSettings(SinkBase):
    type: Literal["webhook"]
    url: str
    #: one ``whsec_...`` secret, or several (each signs; for rotation); none: unsigned
    secret: Annotated[list[WebhookSecret] | None, BeforeValidator(_as_list)] = None
    secret_file: SafePath | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(15.0, gt=0, le=300)
    retry_schedule_s: list[Annotated[float, Field(gt=0, le=86400)]] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_SCHEDULE_S), max_length=50
    )
    max_age_s: float | None = Field(None, gt=0)
    max_concurrency: int = Field(4, ge=1, le=64)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value, _WEBHOOK_URL_RE)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            lowered = name.lower()
            if lowered.startswith("webhook-") or lowered in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by qawatch itself")
            if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any((ord(char) < 32 and char != "\t") or ord(char) == 127 for char in text):
                # a YAML block scalar leaves a trailing newline; aiohttp would refuse every request
                raise ValueError(f"the value of header {name!r} has a line break or control character")
        return value

    @model_validator(mode="after")
    def _one_secret_source(self) -> WebhookSinkSettings:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set secret or secret_file, not both")
        if url_password(self.url) is not None and any(h.lower() == "authorization" for h in self.headers):
            # aiohttp would refuse every request: the URL's credentials are an Authorization header
            raise ValueError("credentials in the url and an Authorization header cannot both be sent")
        return self

    def secrets(self) -> list[str]:
        return [value.get_secret_value() for value in self.secret or []]


SinkSettings = Annotated[
    StdoutSinkSettings | FileSinkSettings | WebhookSinkSettings, Field(discriminator="type")
]


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8787`` for IPv6) as a (host, port) pair; ValueError if not."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", listen.strip())
    if not match:
        raise ValueError(f"{listen!r} is not host:port (e.g. 127.0.0.1:8787)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"{listen!r}: port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ControlSettings(Section):
    listen: str | None = "127.0.0.1:8787"
    token: SecretStr | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        # in an environment variable, "null", "none", "off" or "" disable it too
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none", "off"):
            return None
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_listen(value)
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ControlSettings:
        if self.listen is not None and self.token is None and not is_loopback(split_listen(self.listen)[0]):
            raise ValueError(
                f"control.token is required when control.listen is not a loopback address ({self.listen})"
            )
        return self


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ShutdownSettings(Section):
    grace_s: float = Field(10.0, ge=0, le=600)


_yaml_data: ContextVar[dict[str, Any]] = ContextVar("_yaml_data", default={})  # noqa: B039 - never mutated


class _YamlSource(PydanticBaseSettingsSource):
    """The already-parsed YAML file, weakest source above the defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


def _default_sinks() -> list[SinkSettings]:
    return [StdoutSinkSettings(type="stdout")]


class Settings(BaseSettings):
    """Everything qawatch can be configured with; see config/qawatch.example.yaml."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    api: ApiSettings = ApiSettings()
    poll: PollSettings = PollSettings()
    watch: WatchSettings = WatchSettings()
    state: StateSettings = StateSettings()
    sinks: list[SinkSettings] = Field(default_factory=_default_sinks)
    control: ControlSettings = ControlSettings()
    log: LogSettings = LogSettings()
    shutdown: ShutdownSettings = ShutdownSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _sink_names(self) -> Settings:
        # A sink's name keys its delivery queue in the store: see sink_names for the defaults.
        # (A model validator, so that the message can name the exact key.)
        seen: set[str] = set()
        for name in sink_names(self):
            if name in seen:
                raise ValueError(f"sinks: two sinks are named {name!r}; give each a distinct name")
            seen.add(name)
        return self


def sink_names(settings: Settings) -> list[str]:
    """Each sink's name, which keys its delivery queue in the store: its ``name``; else its
    type when it is the only sink of that type; else its type and a digest of its destination
    (``file-3f9a0c1e``). A default that followed the position (webhook, webhook-2) would hand
    one endpoint's pending events to another as soon as a sink is removed or reordered."""
    counts = Counter(sink.type for sink in settings.sinks)
    return [
        sink.name or (sink.type if counts[sink.type] == 1 else f"{sink.type}-{_destination_digest(sink)}")
        for sink in settings.sinks
    ]


def _destination_digest(sink: SinkSettings) -> str:
    """8 hex digits of where ``sink`` delivers (a webhook URL without its credentials)."""
    if isinstance(sink, FileSinkSettings):
        where = str(sink.path)
    elif isinstance(sink, WebhookSinkSettings):
        where = mask_url(sink.url)
    else:
        where = sink.type
    return hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _read_yaml(path: Path, source: str = "--config") -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config error: {source}: no such file: {path}") from None
    except OSError as exc:
        raise ConfigError(f"config error: {source}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: --config: {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config error: {path}:{where} {problem}") from None
    except RecursionError:  # PyYAML builds nested collections recursively
        raise ConfigError(f"config error: {path}: nested too deeply to be a qawatch configuration") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: the top level must be a mapping of keys")
    for key in data:
        if not isinstance(key, str):  # `1: 2` or `true: x`: pydantic would fail with a TypeError
            raise ConfigError(f"config error: {_yaml_scalar(key)}: unknown key (keys are names like api)")
    return data


def _yaml_scalar(value: Any) -> str:
    """``value`` as it was written in YAML (``true``, not ``True``), on one line."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True).splitlines()[0]
    except yaml.YAMLError:
        text = repr(value)
    return text


_SECRET_KEYS = ("token", "secret", "headers")


#: errors where a section (a mapping or list) was expected: the input may be a misplaced secret
_SECTION_KINDS = ("model_type", "model_attributes_type", "dict_type", "list_type")


def _key(loc: tuple[Any, ...]) -> str:
    """The dotted key as the user writes it: ``sinks.0.path``, not pydantic's ``sinks.0.file.path``
    (inside a discriminated union, the third part of the location is always the sink's type)."""
    parts = list(loc)
    if len(parts) >= 3 and parts[0] == "sinks" and isinstance(parts[1], int):
        del parts[2]
    return ".".join(str(part) for part in parts)


def _describe(error: Mapping[str, Any]) -> str:
    loc = _key(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    secret = any(key in loc for key in _SECRET_KEYS) or kind in _SECTION_KINDS
    value = error.get("input")
    if loc.endswith("url") and isinstance(value, str):
        value = mask_url(value)
    got = shown_id(value) if isinstance(value, str) else repr(value)  # cut when very long
    named = repr(value) in message or got in message
    if not secret and isinstance(value, str | int | float | bool) and not named:
        message = f"{message} (got {got})"
    return f"{loc}: {message}" if loc else message


def format_validation_error(exc: ValidationError, env_keys: Mapping[str, str] | None = None) -> str:
    """One line for every error; an unknown key that came from the environment is named as the
    variable the user set (``env_keys``: dotted key -> variable)."""
    parts = []
    for err in exc.errors():
        key = _key(tuple(err.get("loc", ())))
        if err.get("type") == "extra_forbidden" and env_keys and key in env_keys:
            parts.append(f"{env_keys[key]}: unknown setting in the environment")
        else:
            parts.append(_describe(err))
    return "config error: " + "; ".join(parts)


def _env_key_names(exc: ValidationError, yaml: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """For each unknown key not in the YAML file, the ``QAWATCH_`` variable that set it."""
    names: dict[str, str] = {}
    by_upper = {name.upper(): name for name in env}
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") != "extra_forbidden" or _in_yaml(yaml, loc):
            continue
        variable = ENV_PREFIX + "__".join(str(part) for part in loc).upper()
        if variable in by_upper:
            names[_key(loc)] = by_upper[variable]
    return names


def _in_yaml(data: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        in_mapping = isinstance(data, Mapping) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if not (in_mapping or in_list):
            return False
        data = data[part]
    return True


#: settings that are paths: relative ones in a YAML file are relative to the file's folder
_PATH_KEYS = (("api", "token_file"), ("watch", "file"), ("state", "path"))
_SINK_PATH_KEYS = ("path", "secret_file")


def _anchor_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data`` with its relative paths made relative to ``folder``, as docker compose does."""

    def anchored(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str(folder / value)
        return value

    for section, key in _PATH_KEYS:
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            part[key] = anchored(part[key])
    sinks = data.get("sinks")
    for sink in sinks if isinstance(sinks, list) else ():
        for key in _SINK_PATH_KEYS if isinstance(sink, dict) else ():
            if key in sink:
                sink[key] = anchored(sink[key])
    return data


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings or raise :class:`ConfigError` with a one-line message."""
    env = os.environ if environ is None else environ
    unknown = unknown_env_keys(env)
    if unknown:
        raise ConfigError(f"config error: {unknown[0]}: unknown setting in the environment")
    path = config or env.get(CONFIG_ENV) or None
    source = "--config" if config else CONFIG_ENV
    data = _anchor_paths(_read_yaml(Path(path), source), Path(path).parent) if path else {}
    token = _yaml_data.set(data)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, _env_key_names(exc, data, env))) from None
    except SettingsError as exc:
        raise ConfigError(f"config error: {_first_line(exc)}") from None
    except RecursionError:  # a JSON value in the environment (QAWATCH_SINKS='[[[[...')
        where = f"{path} or the environment" if path else "the environment"
        raise ConfigError(f"config error: a value in {where} is nested too deeply") from None
    finally:
        _yaml_data.reset(token)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unknown_env_keys(environ: Mapping[str, str] | None = None) -> list[str]:
    """``QAWATCH_*`` variables that name no setting (a typo would otherwise be ignored)."""
    env = os.environ if environ is None else environ
    known = set(Settings.model_fields)
    bad = []
    for name in env:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        first = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in known:
            bad.append(name)
    return sorted(bad)


def _check_token(value: str, key: str) -> str:
    """``value`` if it can go into an Authorization header as it is; the message never shows it."""
    if "\n" in value or "\r" in value:
        raise ConfigError(f"config error: {key}: the token has more than one line; keep only the token")
    if any(char.isspace() or unicodedata.category(char).startswith("C") for char in value):
        raise ConfigError(f"config error: {key}: the token contains whitespace or a control character")
    return value


def resolve_token(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The API token: ``api.token``, else ``api.token_file``, else systemd's credential.

    Surrounding whitespace is dropped; whitespace or control characters inside it are an error
    (a second line in a token file would otherwise be sent as part of the header)."""
    env = os.environ if environ is None else environ
    if settings.api.token is not None:
        value = settings.api.token.get_secret_value().strip()
        if not value:
            raise ConfigError("config error: api.token: is empty")
        return _check_token(value, "api.token")
    path = settings.api.token_file
    key = "api.token_file"
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / "token"
        if candidate.exists():
            path, key = candidate, "$CREDENTIALS_DIRECTORY/token"
    if path is None:
        raise ConfigError(
            "config error: api.token: no API token; set QAWATCH_API__TOKEN, api.token or api.token_file"
        )
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"config error: {key}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {key}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"config error: {key}: {path} is empty")
    return _check_token(value, key)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret replaced by ``'***'`` and
    credentials in URLs masked (:func:`mask_url`)."""
    data: dict[str, Any] = settings.model_dump(mode="json")

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            if key == "headers":  # header values often carry credentials
                return dict.fromkeys(node, "***")
            return {k: scrub(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v, key) for v in node]
        if key in _SECRET_KEYS and node is not None:
            return "***"
        return node

    scrubbed: dict[str, Any] = scrub(data)
    scrubbed["api"]["base_url"] = mask_url(scrubbed["api"]["base_url"])
    if scrubbed["state"].get("url"):
        scrubbed["state"]["url"] = mask_url(scrubbed["state"]["url"])
    for sink, name in zip(scrubbed["sinks"], sink_names(settings), strict=True):
        sink["name"] = name  # the effective name: it keys the sink's queue in the store
        if "url" in sink:
            sink["url"] = mask_url(sink["url"])
    return scrubbed
