"""The `qawatch` command line. Every user-caused problem is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import shtab
import yaml

from daemon import __version__, ctl, deadletters, logs
from daemon.app import App, read_watch_file
from daemon.demo import run_demo
from daemon.durations import parse_duration
from daemon.errors import ConfigError, ExitCode, NotFoundError, QawatchError, RejectedError, UpstreamError
from daemon.oneshot import ask, watch_many
from daemon.progress import stderr_display
from daemon.qatech import QATechClient
from daemon.scheduler import Pacing
from daemon.settings import (
    FileSinkSettings,
    PollSettings,
    Settings,
    WebhookSinkSettings,
    bad_id_message,
    is_short_id,
    load_settings,
    mask_url,
    redacted,
    resolve_token,
    unknown_env_keys,
    url_password,
)
from daemon.simulator import SimConfig, serve
from daemon.sinks.webhook import read_secret_file


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"qawatch: {message} (see 'qawatch --help')\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # nan would pass every comparison below; inf never ends
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must be from {low} to {high}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def _add_common(parser: argparse.ArgumentParser, *, api: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML configuration (default: $QAWATCH_CONFIG)")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (log.level)",
    )
    parser.add_argument(
        "--log-format", choices=["auto", "json", "console"], help="log.format (auto: console on a terminal)"
    )
    if api:
        parser.add_argument("--base-url", metavar="URL", help="QA.tech API base URL (api.base_url)")


JSON_HELP = "machine-readable output (times in Unix seconds)"


def _add_control_commands(sub: Any) -> None:
    add = sub.add_parser("add", help="watch ids in a running daemon (control API)")
    add.add_argument("ids", nargs="+", metavar="ID", help="conversation short ids to watch")
    add.add_argument("--backfill", choices=["latest", "none"], help="default: watch.backfill")
    remove = sub.add_parser("remove", help="stop watching ids added at runtime")
    remove.add_argument("ids", nargs="+", metavar="ID", help="conversation short ids added at runtime")
    listing = sub.add_parser("list", help="the running daemon's watches")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    health = sub.add_parser("health", help="exit 0 when the running daemon is ready, else 1")
    for control_cmd in (add, remove, listing, health):
        _add_common(control_cmd, api=False)


def _add_dead_letter_commands(sub: Any) -> None:
    dead = sub.add_parser("dead-letters", help="list or replay events a sink gave up on")
    dead_sub = dead.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    dead_list = dead_sub.add_parser("list", help="the dead letters, oldest first")
    dead_list.add_argument("--json", action="store_true", help=JSON_HELP)
    dead_replay = dead_sub.add_parser("replay", help="queue dead letters again (same event ids)")
    which = dead_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="event_id", metavar="ID", help="one event")
    which.add_argument("--since", metavar="TIME", help="events since TIME (ISO 8601, or 30m, 2h, 1d ago)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    for action in (dead_list, dead_replay):
        action.add_argument("--sink", metavar="NAME", help="only this sink")
        _add_common(action, api=False)
        action.add_argument("--state", metavar="FILE", help="SQLite state file (state.path)")


def _duration(text: str) -> float:
    """An argparse type: a positive duration with or without a unit (90, 90s, 15m, 2h)."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < value <= 366 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most a year")
    return value


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_duration,
        default=1800.0,
        metavar="DURATION",
        help="give up after this long with exit 3: 90, 90s, 15m, 2h (default 30m)",
    )


def _interval(text: str) -> float:
    value = _duration(text)
    if value > 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is more than an hour")
    return value


def _add_output(parser: argparse.ArgumentParser) -> None:
    """``watch`` and ``ask``: how often to poll, and what goes to stdout."""
    parser.add_argument(
        "--interval",
        type=_interval,
        metavar="DURATION",
        help="poll a waiting conversation this often, at most 1h (poll.active_interval_s, default 2s)",
    )
    parser.add_argument(
        "--output",
        choices=["json", "text"],
        default="json",
        help="json: one event line per conversation (default); text: only the reply's text",
    )


def _add_progress(parser: argparse.ArgumentParser) -> None:
    """``watch`` and ``ask``: what they show on stderr while they wait, and when they give up
    on an API that cannot be reached."""
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress on stderr (failed replies and errors are still named there)",
    )
    parser.add_argument(
        "--progress-every",
        type=_duration,
        default=30.0,
        metavar="DURATION",
        help="when stderr is not a terminal: a progress line per conversation this often (default 30s)",
    )
    parser.add_argument(
        "--unreachable-after",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="exit 4 when the API could not be reached for this long in a row (default 60s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qawatch",
        description="Watch QA.tech chat conversations and deliver every finished assistant reply.",
    )
    parser.add_argument("--version", action="version", version=f"qawatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="the daemon: watch, record and deliver until SIGTERM")
    _add_common(run)
    run.add_argument("--state", metavar="FILE", help="SQLite state file (state.path)")

    watch = sub.add_parser("watch", help="wait for the replies of conversations, print them, exit")
    watch.add_argument("ids", nargs="+", metavar="ID", help="conversation short ids (chat_...)")
    _add_common(watch)
    _add_timeout(watch)
    _add_progress(watch)
    _add_output(watch)

    ask = sub.add_parser("ask", help="send a message (new chat or --chat ID) and wait for the reply")
    ask.add_argument("message", nargs="?", help="the message; - reads it from standard input")
    ask.add_argument("--file", metavar="FILE", help="read the message from FILE instead")
    ask.add_argument("--chat", metavar="ID", help="send a follow-up in this conversation")
    _add_common(ask)
    _add_timeout(ask)
    _add_progress(ask)
    _add_output(ask)

    check = sub.add_parser("check-config", help="validate and print the effective settings")
    _add_common(check)
    check.add_argument(
        "--no-token",
        action="store_true",
        help="validate everything but the API token, e.g. when systemd provides it at start",
    )
    check.add_argument(
        "--check-api",
        action="store_true",
        help="also send one request: proves that the base URL answers and accepts the token",
    )

    sim = sub.add_parser("simulate", help="run the built-in QA.tech API simulator")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sim.add_argument("--port", type=_int_between(0, 65535), default=8080, help="0: a free port")
    sim.add_argument("--token", default="sim-token", help="the Bearer token it accepts")
    sim.add_argument(
        "--reply-seconds", type=_duration, default=3.0, help="time to a finished reply (3, 3s, 1m)"
    )
    sim.add_argument(
        "--chats", type=_int_between(0, 10_000), default=0, help="start this many conversations at once"
    )
    sim.add_argument("--fail-rate", type=_fraction, default=0.0, help="fraction of replies that end FAILED")
    sim.add_argument(
        "--cancel-rate", type=_fraction, default=0.0, help="fraction of replies that end CANCELLED"
    )
    sim.add_argument("--fault-5xx", type=_fraction, default=0.0, help="fraction of GETs answering 503")
    sim.add_argument("--fault-429", type=_fraction, default=0.0, help="fraction of GETs answering 429")
    sim.add_argument(
        "--fault-malformed",
        type=_fraction,
        default=0.0,
        help="fraction of GETs answering a body that is not JSON",
    )
    sim.add_argument(
        "--fault-wrong-shape",
        type=_fraction,
        default=0.0,
        help="fraction of GETs answering JSON of another shape",
    )
    sim.add_argument("--fault-timeout", type=_fraction, default=0.0, help="fraction of GETs that stall")
    sim.add_argument("--seed", type=int, help="make outcomes, ids and faults repeatable")

    _add_control_commands(sub)
    _add_dead_letter_commands(sub)

    completion = sub.add_parser("completion", help="print a shell completion script (generated)")
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete for")

    demo = sub.add_parser("demo", help="simulator + daemon in one process; needs no token")
    demo.add_argument(
        "--chats", type=int, default=4, choices=range(1, 9), metavar="N", help="conversations to start (1-8)"
    )
    demo.add_argument(
        "--reply-seconds", type=_duration, default=4.0, help="time to a finished reply (4, 4s, 1m)"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "log_level", None):
        out.setdefault("log", {})["level"] = args.log_level
    if getattr(args, "log_format", None):
        out.setdefault("log", {})["format"] = args.log_format
    if getattr(args, "base_url", None):
        out.setdefault("api", {})["base_url"] = args.base_url
    if getattr(args, "state", None):
        out.setdefault("state", {})["path"] = args.state
    if getattr(args, "interval", None):
        out.setdefault("poll", {})["active_interval_s"] = args.interval
        out["poll"]["waiting_interval_s"] = None  # --interval is the pace, whatever the reply's status
        if args.interval > PollSettings.model_fields["idle_interval_s"].default:
            out["poll"]["idle_interval_s"] = args.interval  # settled chats: never faster than that
    return out


def _settings(args: argparse.Namespace) -> Settings:
    bad = unknown_env_keys()
    if bad:
        raise ConfigError(f"config error: {bad[0]}: unknown setting in the environment")
    settings = load_settings(args.config, _overrides(args))

    logs.configure(settings.log.level, settings.log.format)
    return settings


def _check_ids(ids: Sequence[str]) -> None:
    for short_id in ids:
        if not is_short_id(short_id):
            raise ConfigError(f"qawatch: {bad_id_message(short_id)}")


def _run_async(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, int]],
    *,
    cancelled_code: int,
    hup: Callable[[], None] | None = None,
) -> int:
    """Run ``main(stop)``; SIGTERM/SIGINT set ``stop``, a second one cancels everything and
    the command exits with ``cancelled_code`` (3 for watch/ask, whose wait was cut short)."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if hup is not None:
            loop.add_signal_handler(signal.SIGHUP, hup)
        try:
            return await main(stop)
        except asyncio.CancelledError:
            if cancelled_code != ExitCode.OK:
                sys.stderr.write("qawatch: stopped by a second signal\n")
            return cancelled_code

    with asyncio.Runner(loop_factory=_loop_factory()) as loop_runner:
        return loop_runner.run(runner())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the ``fast`` extra; the image has it): less
    CPU per poll (the README's Performance section). ``QAWATCH_UVLOOP=0`` keeps asyncio's own."""
    if os.environ.get("QAWATCH_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_run(args: argparse.Namespace) -> int:

    settings = _settings(args)
    token = resolve_token(settings)
    logs.register_secret(token)
    if settings.control.token is not None:
        logs.register_secret(settings.control.token.get_secret_value())
    for sink in settings.sinks:
        if isinstance(sink, WebhookSinkSettings):
            logs.register_secret(url_password(sink.url))
    app = App(settings, token, settings_loader=lambda: load_settings(args.config, _overrides(args)))
    app.configured_ids()  # a bad watch file is a config error before anything starts

    async def main(stop: asyncio.Event) -> int:
        await app.run(stop)
        return 1 if app.failed else ExitCode.OK

    return _run_async(main, hup=app.request_reload, cancelled_code=ExitCode.OK)


def _client(settings: Settings, token: str) -> QATechClient:
    """The client of watch, ask and check-config: no quick retries inside a call (their own
    loop retries, and --unreachable-after must count every failed attempt)."""
    return QATechClient(
        settings.api.base_url,
        token,
        timeout_s=settings.api.timeout_s,
        max_connections=settings.api.max_concurrency,
        max_response_bytes=settings.api.max_response_bytes,
        connect_retries=0,
    )


def _pacing(settings: Settings) -> Pacing:

    return Pacing(**settings.poll.model_dump())


def cmd_watch(args: argparse.Namespace) -> int:

    _check_ids(args.ids)
    settings = _settings(args)
    token = resolve_token(settings)
    logs.register_secret(token)

    async def main(stop: asyncio.Event) -> int:
        async with _client(settings, token) as client:
            return await watch_many(
                client,
                args.ids,
                pacing=_pacing(settings),
                rate_limit_per_s=settings.api.rate_limit_per_s,
                max_concurrency=settings.api.max_concurrency,
                limit=settings.api.message_limit,
                timeout_s=args.timeout,
                stop=stop,
                display=stderr_display(quiet=args.quiet, every_s=args.progress_every),
                unreachable_after_s=args.unreachable_after,
                output=args.output,
            )

    return _run_async(main, cancelled_code=ExitCode.TIMEOUT)


#: the longest message ``ask`` sends (a pasted log is fine; a runaway pipe is not)
MAX_MESSAGE_BYTES = 1024 * 1024


def _ask_message(args: argparse.Namespace) -> str:
    """The message: the argument, standard input for ``-``, or ``--file``; bounded, UTF-8."""
    if (args.message is None) == (args.file is None):
        raise ConfigError("qawatch: ask: give the message as an argument (- for standard input) or --file")
    where = "--file" if args.file is not None else "standard input"
    try:
        if args.file is not None:
            with open(args.file, "rb") as handle:
                raw = handle.read(MAX_MESSAGE_BYTES + 1)
        elif args.message == "-":
            raw = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)
        else:
            return str(args.message)
    except OSError as exc:
        raise ConfigError(f"qawatch: ask: cannot read {args.file or where}: {exc.strerror}") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ConfigError(f"qawatch: ask: the message from {where} is longer than {MAX_MESSAGE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"qawatch: ask: the message from {where} is not UTF-8 text") from None


def cmd_ask(args: argparse.Namespace) -> int:

    if args.chat:
        _check_ids([args.chat])
    message = _ask_message(args)
    if not message.strip():
        raise ConfigError("qawatch: ask: the message is empty")
    settings = _settings(args)
    token = resolve_token(settings)
    logs.register_secret(token)

    async def main(stop: asyncio.Event) -> int:
        started = time.monotonic()
        async with _client(settings, token) as client:
            short_id, state = await ask(
                client,
                message,
                chat=args.chat,
                limit=settings.api.message_limit,
                pacing=_pacing(settings),
                timeout_s=args.timeout,
                stop=stop,
                unreachable_after_s=args.unreachable_after,
            )
            display = stderr_display(quiet=args.quiet, every_s=args.progress_every)
            display.add(short_id, url_shown=args.chat is None)  # "started" named the new chat's URL
            return await watch_many(
                client,
                [short_id],
                pacing=_pacing(settings),
                rate_limit_per_s=settings.api.rate_limit_per_s,
                max_concurrency=settings.api.max_concurrency,
                limit=settings.api.message_limit,
                # one --timeout for the whole command: sending counts against it
                timeout_s=max(0.001, args.timeout - (time.monotonic() - started)),
                states={short_id: state},
                stop=stop,
                display=display,
                unreachable_after_s=args.unreachable_after,
                output=args.output,
            )

    return _run_async(main, cancelled_code=ExitCode.TIMEOUT)


def cmd_check_config(args: argparse.Namespace) -> int:

    settings = _settings(args)
    if not args.no_token:
        resolve_token(settings)
    if settings.watch.file is not None:
        read_watch_file(settings.watch.file)
    if not settings.state.path.parent.is_dir():
        raise ConfigError(f"config error: state.path: folder {settings.state.path.parent} does not exist")
    for index, sink in enumerate(settings.sinks):
        if isinstance(sink, FileSinkSettings) and not sink.path.parent.is_dir():
            raise ConfigError(f"config error: sinks.{index}.path: folder {sink.path.parent} does not exist")
        if isinstance(sink, WebhookSinkSettings) and sink.secret_file is not None:
            read_secret_file(sink.secret_file, f"sinks.{index}.secret_file")  # as `run` will
    sys.stdout.write(yaml.safe_dump(redacted(settings), sort_keys=False))
    if not settings.sinks:
        sys.stderr.write("qawatch: warning: sinks is empty: replies are recorded but delivered nowhere\n")
    if args.check_api:
        if args.no_token:
            raise ConfigError("qawatch: check-config: --check-api needs the token; leave out --no-token")
        message = asyncio.run(check_api(settings, resolve_token(settings)))
        sys.stderr.write(f"qawatch: {message}\n")
    return ExitCode.OK


async def check_api(settings: Settings, token: str) -> str:
    """Two GETs of one conversation (a watched id, else one no one has): without a token the
    API must refuse it (401/403: a server that does not ask for one is not QA.tech's API), with
    the token it must look the id up (200, 404 or 400). Anything else raises (exit 4)."""
    short_id = settings.watch.ids[0] if settings.watch.ids else "chat_qawatch-check"
    base_url = mask_url(settings.api.base_url)
    probe = f"{settings.api.base_url}/v1/chat/{quote(short_id, safe='')}"
    timeout = aiohttp.ClientTimeout(total=settings.api.timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(probe) as resp:
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise UpstreamError(f"check-config --check-api: cannot reach {base_url}: {reason}") from None
    if status not in (401, 403):
        raise UpstreamError(
            f"check-config --check-api: {base_url} answered {status} to a request without a token: "
            "it does not look like the QA.tech API (check api.base_url)",
            status=status,
        )
    async with _client(settings, token) as client:
        try:
            await client.get_conversation(short_id, 1)
        except (NotFoundError, RejectedError):
            pass  # the API looked the id up: it took the token
        except UpstreamError as exc:
            reason = str(exc).removeprefix(f"{short_id}: ")
            raise UpstreamError(
                f"check-config --check-api: {base_url}: {reason}", status=exc.status
            ) from None
    return f"api: {base_url} answers and accepts the token"


def cmd_completion(args: argparse.Namespace) -> int:
    """E.g. ``source <(qawatch completion bash)``; generated from this very parser."""
    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


def cmd_simulate(args: argparse.Namespace) -> int:

    config = SimConfig(
        token=args.token,
        reply_s=args.reply_seconds,
        fail_rate=args.fail_rate,
        cancel_rate=args.cancel_rate,
        seed=args.seed,
        fault_5xx=args.fault_5xx,
        fault_429=args.fault_429,
        fault_malformed=args.fault_malformed,
        fault_wrong_shape=args.fault_wrong_shape,
        fault_timeout=args.fault_timeout,
    )

    async def main(stop: asyncio.Event) -> int:
        server = asyncio.create_task(serve(config, host=args.host, port=args.port, chats=args.chats))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not server.done():
            server.cancel()
        try:
            await server
        except asyncio.CancelledError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"qawatch: simulate: cannot listen on {args.host}:{args.port}: {exc.strerror}"
            ) from None
        return ExitCode.OK

    return _run_async(main, cancelled_code=ExitCode.OK)


def cmd_demo(args: argparse.Namespace) -> int:

    return _run_async(
        lambda stop: run_demo(stop, chats=args.chats, reply_s=args.reply_seconds), cancelled_code=ExitCode.OK
    )


def cmd_control(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out, err = sys.stdout, sys.stderr
    if args.command == "add":
        return asyncio.run(ctl.add(settings, args.ids, args.backfill, out))
    if args.command == "remove":
        return asyncio.run(ctl.remove(settings, args.ids, out))
    if args.command == "list":
        return asyncio.run(ctl.list_watches(settings, args.json, out, time.time()))
    return asyncio.run(ctl.health(settings, out, err))


def cmd_dead_letters(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "list":
        return deadletters.list_dead(settings.state.path, args.sink, sys.stdout, as_json=args.json)
    return deadletters.replay(
        settings.state.path, sink=args.sink, event_id=args.event_id, since=args.since, out=sys.stdout
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "watch": cmd_watch,
    "ask": cmd_ask,
    "completion": cmd_completion,
    "check-config": cmd_check_config,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "dead-letters": cmd_dead_letters,
    "add": cmd_control,
    "remove": cmd_control,
    "list": cmd_control,
    "health": cmd_control,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if sys.stdout is None:  # started with >&-: events would go nowhere
        sys.stderr.write("qawatch: standard output is closed\n")
        return ExitCode.USAGE
    if not (sys.argv[1:] if argv is None else argv):  # bare `qawatch`: what it can do
        parser.print_help()
        return ExitCode.OK
    return _dispatch(parser.parse_args(argv))


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every failure is one line on stderr and an exit code."""
    try:
        return COMMANDS[args.command](args)
    except QawatchError as exc:
        message = str(exc)
        if not message.startswith("qawatch:"):
            message = f"qawatch: {message}"
        sys.stderr.write(message + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK
    except BrokenPipeError:  # `qawatch watch A B C | head -1`: the reader stopped reading
        with contextlib.suppress(OSError):  # and Python's own flush at exit must not complain
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write("qawatch: standard output was closed before everything was written\n")
        return ExitCode.USAGE
    except Exception as exc:  # noqa: BLE001 - a bug: one line, never a traceback, never a secret
        sys.stderr.write(internal_error_line(exc) + "\n")
        return ExitCode.REPLY_FAILED  # 1: also "an internal error", as the README says


def internal_error_line(exc: BaseException) -> str:
    """``qawatch: internal error: <type>: <message>`` on one line, registered secrets scrubbed."""
    message = " ".join(str(exc).split())
    text = f"qawatch: internal error: {type(exc).__name__}" + (f": {message}" if message else "")
    return logs.scrub(text)
