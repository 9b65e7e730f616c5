"""Benchmark: the daemon against the in-process simulator, on this machine.

Watches N simulated chats whose replies finish at staggered times, and reports how quickly
each finished reply reaches a sink (detection delay), how many requests that cost, and the
CPU the daemon used. Not a test: numbers depend on the machine; run it with `make bench`.

    python bench/run.py [--chats 500] [--reply-seconds 4] [--active 1.0] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import logs
from daemon.app import App
from daemon.settings import Settings
from daemon.simulator import SimConfig, Simulator
from daemon.sinks.memory import MemorySink


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def bench(chats: int, reply_s: float, active_s: float, rate: float, concurrency: int) -> dict[str, Any]:
    sim = Simulator(SimConfig(reply_s=reply_s, seed=1))
    base_url = await sim.start()
    received: dict[str, float] = {}
    all_in = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        received.setdefault(event["data"]["conversation"]["shortId"], time.time())
        if len(received) == chats:
            all_in.set()

    sink = MemorySink("bench", on_event=on_event)
    ids = [sim.create_chat(f"question {i}", reply_s=reply_s * (0.5 + (i % 10) / 10)) for i in range(chats)]
    started = time.time()
    cpu0 = _cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            api={
                "base_url": base_url,
                "token": sim.config.token,
                "rate_limit_per_s": rate,
                "max_concurrency": concurrency,
            },
            poll={"active_interval_s": active_s, "idle_interval_s": 30, "jitter": 0.1},
            watch={"ids": ids, "file": None},
            state={"path": Path(tmp) / "bench.db"},
            sinks=[],
            log={"level": "error"},
            control={"listen": None},
        )
        app = App(settings, sim.config.token, sinks=[sink])
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), reply_s * 1.5 + 60)
        stop.set()
        await task
    cpu = _cpu_s() - cpu0
    elapsed = time.time() - started
    gets = [r for r in sim.requests if r.method == "GET"]
    await sim.stop()
    # detection delay: event received minus the wall time the simulator finished the reply
    delays = []
    for short_id in ids:
        if short_id not in received:
            continue
        body = sim.conversation_json(short_id)
        reply = next(m for m in body["messages"] if m["role"] == "assistant")
        created = datetime.fromisoformat(reply["createdAt"].replace("Z", "+00:00")).timestamp()
        finished = created + 0.9 * (reply_s * (0.5 + (ids.index(short_id) % 10) / 10))
        delays.append(received[short_id] - finished)
    return {
        "chats": chats,
        "delivered": len(received),
        "elapsed_s": round(elapsed, 2),
        "requests": len(gets),
        "requests_per_reply": round(len(gets) / max(1, len(received)), 2),
        "peak_rps_limit": rate,
        "detect_delay_p50_s": round(statistics.median(delays), 3) if delays else None,
        "detect_delay_p95_s": round(_pct(delays, 0.95), 3) if delays else None,
        "detect_delay_max_s": round(max(delays), 3) if delays else None,
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_request": round(1000 * cpu / max(1, len(gets)), 3),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chats", type=int, default=500)
    parser.add_argument("--reply-seconds", type=float, default=4.0)
    parser.add_argument("--active", type=float, default=1.0, help="poll.active_interval_s")
    parser.add_argument("--rate", type=float, default=400.0, help="api.rate_limit_per_s")
    parser.add_argument("--concurrency", type=int, default=32, help="api.max_concurrency")
    args = parser.parse_args()
    logs.configure("error", "json")
    result = asyncio.run(bench(args.chats, args.reply_seconds, args.active, args.rate, args.concurrency))
    result["machine"] = (
        f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}"
    )
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if result["delivered"] == result["chats"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
