"""Soak: `qawatch run` with many watches for minutes, its memory sampled from /proc.

The simulator runs in this process and keeps every conversation busy with follow-ups, with a
share of GETs answered by every fault class; the daemon is a real child process with a file
sink. It prints the daemon's RSS after the warm-up and at the end, and the growth between them.

    python bench/soak.py [--watches 1000] [--seconds 180] [--warmup 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from daemon.simulator import SimConfig, Simulator

TOKEN = "soak-token"  # the simulator's throwaway token
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def keep_busy(sim: Simulator, ids: list[str], rng: random.Random, stop: asyncio.Event) -> int:
    """Follow up a few finished chats every 100 ms; the number of follow-ups sent."""
    sent = 0
    while not stop.is_set():
        for short_id in rng.sample(ids, min(20, len(ids))):
            newest = sim.conversation_json(short_id, limit=1)["messages"]
            if newest and newest[0]["role"] == "assistant" and newest[0]["status"] in TERMINAL:
                sim.send_message(short_id, f"follow-up {sent}", reply_s=rng.uniform(1.0, 20.0))
                sent += 1
        await asyncio.sleep(0.1)
    return sent


async def soak(watches: int, seconds: float, warmup: float) -> int:
    rng = random.Random(1)
    config = SimConfig(token=TOKEN, seed=1, fault_5xx=0.02, fault_429=0.005, fault_malformed=0.01)
    sim = Simulator(config)
    base_url = await sim.start()
    ids = [sim.create_chat(f"question {i}", reply_s=rng.uniform(1.0, 20.0)) for i in range(watches)]
    with tempfile.TemporaryDirectory(prefix="qawatch-soak-") as tmp:
        work = Path(tmp)
        settings = {
            "api": {"base_url": base_url, "rate_limit_per_s": 200},
            "poll": {"active_interval_s": 2, "idle_interval_s": 10},
            "watch": {"ids": ids},
            "state": {"path": str(work / "state.db")},
            "sinks": [{"type": "file", "path": str(work / "replies.ndjson")}],
            "control": {"listen": None},
        }
        (work / "qawatch.yaml").write_text(json.dumps(settings))
        env = {**os.environ, "QAWATCH_API__TOKEN": TOKEN, "QAWATCH_LOG__LEVEL": "error"}
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "run", "--config", str(work / "qawatch.yaml"),
            env=env, cwd=work, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        stop = asyncio.Event()
        busy = asyncio.create_task(keep_busy(sim, ids, rng, stop))
        started = time.monotonic()
        await asyncio.sleep(warmup)
        first = rss_kib(daemon.pid)
        samples = [first]
        while time.monotonic() - started < seconds:
            await asyncio.sleep(10)
            samples.append(rss_kib(daemon.pid))
        stop.set()
        sent = await busy
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait()
        replies = len((work / "replies.ndjson").read_text().splitlines())
    await sim.stop()
    gets = sum(1 for r in sim.requests if r.method == "GET")
    growth = 100.0 * (samples[-1] - first) / first
    print(
        f"soak: {watches} watches for {seconds:.0f} s: {gets} GETs, {sent} follow-ups, "
        f"{replies} events written"
    )
    print(
        f"soak: RSS after {warmup:.0f} s warm-up {first / 1024:.1f} MiB, "
        f"at the end {samples[-1] / 1024:.1f} MiB (max {max(samples) / 1024:.1f} MiB): "
        f"growth {growth:+.1f}%; exit on SIGTERM {code}"
    )
    return 0 if code == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watches", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    args = parser.parse_args()
    return asyncio.run(soak(args.watches, args.seconds, args.warmup))


if __name__ == "__main__":
    sys.exit(main())
