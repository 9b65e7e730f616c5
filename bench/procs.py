"""Process helpers for the benchmark: CPU and memory from /proc, free ports, clean stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The harness itself failed (a process did not start, replies were lost): not a measurement."""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process ``pid`` in KiB, from /proc/<pid>/status."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> dict[str, str | int]:
    """CPU model, cores and Python version of this machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any QAWATCH_ variable, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("QAWATCH_")}
    env.update(extra)
    return env


async def stop_process(proc: asyncio.subprocess.Process, within_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``within_s`` seconds; the exit code (negative: a signal)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), within_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    code = proc.returncode
    return -1 if code is None else code
