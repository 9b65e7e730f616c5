"""A real `qawatch run` process for the benchmark: its configuration, start, metrics, stop and
log; and a tail of its file sink that notes when each line appears."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import BenchError, clean_env, cpu_s, free_port, memory_kib, stop_process

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_PROBLEM_LEVELS = ("warning", "error", "critical")


class Daemon:
    """`qawatch run --config <workdir>/qawatch.yaml` with a file sink and its control API."""

    def __init__(
        self,
        workdir: Path,
        api_url: str,
        token: str,
        ids: list[str],
        *,
        poll: dict[str, float],
        api: dict[str, float],
        backfill: str = "none",
        state: dict[str, object] | None = None,
    ) -> None:
        self.workdir = workdir
        self.token = token
        self.sink = workdir / "replies.ndjson"
        self.log_path = workdir / "daemon.log"
        self.control_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_codes: list[int] = []
        watch_file = workdir / "watch.txt"
        watch_file.write_text("".join(f"{short_id}\n" for short_id in ids))
        self.config = workdir / "qawatch.yaml"
        settings = {
            "api": {"base_url": api_url, **api},
            "poll": poll,
            "watch": {"file": str(watch_file), "backfill": backfill},
            "state": state or {"path": str(workdir / "state.db")},
            "sinks": [{"type": "file", "path": str(self.sink)}],
            "control": {"listen": f"127.0.0.1:{self.control_port}"},
            "log": {"level": "warning", "format": "json"},
        }
        self.config.write_text(json.dumps(settings, indent=2))  # JSON is YAML

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the daemon is not running")
        return self.proc.pid

    async def start(self) -> float:
        """Spawn the daemon; the wall time just before the spawn."""
        if self.proc is not None and self.proc.returncode is None:
            raise BenchError("the daemon is already running")
        spawned = time.time()
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon", "run", "--config", str(self.config),
                cwd=self.workdir, env=clean_env(QAWATCH_API__TOKEN=self.token),
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        return spawned

    def dead(self) -> str | None:
        """Why the daemon is not running (with the end of its log), or None while it runs."""
        if self.proc is None or self.proc.returncode is None:
            return None
        tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        return f"the daemon exited with {self.proc.returncode}: {tail.strip()}"

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def event_loop(self) -> str:
        """``uvloop`` when the daemon's process has uvloop's extension loaded, else ``asyncio``."""
        maps = Path(f"/proc/{self.pid}/maps").read_text()
        return "uvloop" if "/uvloop/" in maps else "asyncio"

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The control API's /metrics, parsed: sample name -> [(labels, value)]."""
        url = f"http://127.0.0.1:{self.control_port}/metrics"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url) as resp,
        ):
            text = await resp.text()
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or line.startswith("#"):
                continue
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.setdefault(match["name"], []).append((labels, float(match["value"])))
        return samples

    async def stop(self, within_s: float = 30.0) -> int:
        """SIGTERM (then SIGKILL after ``within_s``); the exit code."""
        if self.proc is None:
            return 0
        code = await stop_process(self.proc, within_s)
        self.exit_codes.append(code)
        return code

    def problems(self) -> dict[str, Any]:
        """Warnings and errors in the daemon's log: counts per level and a few messages."""
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                level, message = _level_and_message(line)
                if level in _PROBLEM_LEVELS:
                    levels[level] += 1
                    messages[f"{level}: {message}"] += 1
        return {
            "levels": dict(levels),
            "top": [f"{text} (x{count})" for text, count in messages.most_common(4)],
            "exit_codes": self.exit_codes,
        }


def _level_and_message(line: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except ValueError:
        return ("error" if "Traceback" in line or "Error" in line else "other"), line[:160]
    if not isinstance(record, dict):
        return "other", line[:160]
    return str(record.get("level", "other")).lower(), str(record.get("event", line))[:160]


def histogram(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets ``[(le, count)]``, +Inf last; [] if absent."""
    buckets = [(float(labels["le"]), value) for labels, value in samples.get(f"{name}_bucket", [])]
    return sorted(buckets)


class FileTail:
    """Follows a file sink and notes the wall time each reply's line first appeared."""

    def __init__(self, path: Path, every_s: float = 0.005) -> None:
        self.path = path
        self.every_s = every_s
        self.seen: dict[str, float] = {}  # short id -> when its (first) reply line appeared
        self.repeats = 0  # lines for a message id already seen
        self.lines = 0
        self._ids: set[str] = set()
        self._offset = 0
        self._partial = b""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.read()

    async def _run(self) -> None:
        while True:
            self.read()
            await asyncio.sleep(self.every_s)

    def read(self) -> None:
        """Read what was appended since the last call."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.time()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._note(line, now)

    def _note(self, line: bytes, now: float) -> None:
        event = json.loads(line)
        self.lines += 1
        if not str(event.get("type", "")).startswith("chat.reply."):
            return
        message_id = event["data"]["message"]["id"]
        short_id = event["data"]["conversation"]["shortId"]
        key = f"{short_id}/{message_id}"
        if key in self._ids:
            self.repeats += 1
            return
        self._ids.add(key)
        self.seen.setdefault(short_id, now)
