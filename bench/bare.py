"""The bare loop: what one aiohttp process can poll at best, the benchmark's baseline.

One ``ClientSession``, ``--concurrency`` tasks each doing ``GET /v1/chat/{id}?limit=20`` and
``await resp.json()`` (stdlib json) in a loop over the given conversations, on the default
event loop (``--uvloop``: uvloop's). After ``--warmup`` seconds it counts requests, its own
CPU and the simulator's (``--sim-pid``) for ``--seconds``, and prints one JSON line.

    python -m bench.bare --base URL --token T --prefix s --count 20000 --sim-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

from bench.procs import cpu_s
from bench.simproc import chat_ids


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the loop and measure its steady window."""
    urls = [f"{args.base}/v1/chat/{short_id}?limit=20" for short_id in chat_ids(args.prefix, args.count)]
    done = 0
    stopping = False

    async def worker(session: aiohttp.ClientSession, start: int) -> None:
        nonlocal done
        i = start
        while not stopping:
            async with session.get(urls[i % len(urls)]) as resp:
                await resp.json()
            done += 1
            i += args.concurrency

    headers = {"Authorization": f"Bearer {args.token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        tasks = [asyncio.create_task(worker(session, k)) for k in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        n0, t0, own0, sim0 = done, time.monotonic(), cpu_s(os.getpid()), cpu_s(args.sim_pid)
        await asyncio.sleep(args.seconds)
        n1, t1, own1, sim1 = done, time.monotonic(), cpu_s(os.getpid()), cpu_s(args.sim_pid)
        stopping = True
        await asyncio.gather(*tasks)
    requests = max(1, n1 - n0)
    return {
        "requests": n1 - n0,
        "seconds": round(t1 - t0, 3),
        "rps": (n1 - n0) / (t1 - t0),
        "cpu_per_request_us": 1e6 * (own1 - own0) / requests,
        "cpu_share": (own1 - own0) / (t1 - t0),
        "sim_cpu_per_request_us": 1e6 * (sim1 - sim0) / requests,
        "sim_cpu_share": (sim1 - sim0) / (t1 - t0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--sim-pid", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional (the `fast` extra)

        result = uvloop.run(measure(args))
    else:
        result = asyncio.run(measure(args))
    result["loop"] = "uvloop" if args.uvloop else "asyncio"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
