"""Crash test: `qawatch run` killed with SIGKILL at random moments must lose nothing.

The simulator (upstream) and a webhook receiver run in this process; the daemon runs as a
real `qawatch run` child process with a file sink and a webhook sink on a real SQLite file.
Conversations get follow-ups until ``--replies`` replies have finished; meanwhile the daemon
is killed ``--kills`` times (kill -9, then started again at once). At the end every finished
reply must be in the file and at the webhook: it prints lost / repeated / kills per sink and
exits 1 when anything was lost, a reply came under two event ids, or a sink saw more repeats
than there were kills (only the delivery in flight at a kill may be repeated).

    python bench/chaos.py [--replies 200] [--kills 20] [--chats 20] [--seed 1] [--faults]

With ``--faults`` the simulator also answers a share of GETs with 503, 429, a 3 s stall
(over the daemon's 2 s timeout), a body that is not JSON and JSON of the wrong shape.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon.simulator import SimConfig, Simulator

TOKEN = "chaos-token"  # the simulator's throwaway token
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


class Receiver:
    """A webhook target that records every delivery (webhook-id, message id)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if body["type"].startswith("chat.reply."):
            self.hits.append((request.headers["webhook-id"], body["data"]["message"]["id"]))
        return web.Response(status=204)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def finished_replies(sim: Simulator, ids: list[str]) -> set[str]:
    replies: set[str] = set()
    for short_id in ids:
        for m in sim.conversation_json(short_id, limit=100)["messages"]:
            if m["role"] == "assistant" and m["status"] in TERMINAL and not m["isStreaming"]:
                replies.add(m["id"])
    return replies


def file_hits(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    hits = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)  # every line must parse: no torn writes
        if event["type"].startswith("chat.reply."):
            hits.append((event["id"], event["data"]["message"]["id"]))
    return hits


async def drive(
    sim: Simulator, ids: list[str], out: Path, *, replies: int, rng: random.Random, done: asyncio.Event
) -> None:
    """Send a follow-up to a chat whose last reply finished, until ``replies`` were asked for.

    A chat gets none before its first reply was delivered: a reply that finished and was
    followed up before the daemon first read the chat is history, not one to deliver."""
    asked = len(ids)
    started: set[str] = set()
    while asked < replies:
        if len(started) < len(ids):
            delivered = {m for _, m in file_hits(out)}
            for short_id in set(ids) - started:
                first = sim.conversation_json(short_id, limit=100)["messages"][-2:-1]  # its first reply
                if first and first[0]["id"] in delivered:
                    started.add(short_id)
        for short_id in sorted(started):
            newest = sim.conversation_json(short_id, limit=1)["messages"]
            finished = newest and newest[0]["role"] == "assistant" and newest[0]["status"] in TERMINAL
            if finished and asked < replies and rng.random() < 0.5:
                sim.send_message(short_id, f"follow-up {asked}", reply_s=rng.uniform(0.2, 1.5))
                asked += 1
        await asyncio.sleep(0.05)
    done.set()


async def start_daemon(config: Path, workdir: Path, log: Any) -> asyncio.subprocess.Process:
    env = {**os.environ, "QAWATCH_API__TOKEN": TOKEN, "QAWATCH_LOG__FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", "--config", str(config),
        env=env, cwd=workdir, stdout=asyncio.subprocess.DEVNULL, stderr=log,
    )  # fmt: skip


#: every fault class the simulator has, on a share of GETs (--faults)
FAULTS = {
    "fault_5xx": 0.05,
    "fault_429": 0.02,
    "fault_timeout": 0.01,
    "fault_malformed": 0.02,
    "fault_wrong_shape": 0.02,
}


def write_config(work: Path, base_url: str, hook: str, ids: list[str]) -> Path:
    config = work / "qawatch.yaml"
    settings = {
        "api": {"base_url": base_url, "rate_limit_per_s": 200, "timeout_s": 2},
        "poll": {"active_interval_s": 0.2, "idle_interval_s": 1.0, "jitter": 0.2},
        "watch": {"ids": ids, "backfill": "latest"},
        "state": {"path": str(work / "state.db")},
        "sinks": [{"type": "file", "path": str(work / "replies.ndjson")}, {"type": "webhook", "url": hook}],
        "control": {"listen": None},
    }
    config.write_text(json.dumps(settings))  # JSON is YAML
    return config


async def wait_delivered(
    sim: Simulator, ids: list[str], receiver: Receiver, out: Path, *, replies: int, deadline: float
) -> set[str]:
    """The finished replies, once every one of them (at least ``replies``) reached both sinks
    or the deadline (a monotonic time) passed."""
    while True:
        truth = finished_replies(sim, ids)
        delivered = {m for _, m in file_hits(out)}, {m for _, m in receiver.hits}
        if (len(truth) >= replies and all(truth <= d for d in delivered)) or time.monotonic() > deadline:
            return truth
        await asyncio.sleep(0.2)


async def stop_daemon(daemon: asyncio.subprocess.Process, log: Path, starts: int) -> int:
    """SIGTERM once the daemon says it runs (a SIGTERM before Python installed its handler
    would end it like a kill); its exit code."""
    for _ in range(200):
        if log.read_bytes().count(b'"qawatch running"') >= starts:  # noqa: ASYNC240 - a small local file
            break
        await asyncio.sleep(0.1)
    daemon.send_signal(signal.SIGTERM)
    return await daemon.wait()


def keep_for_post_mortem(work: Path, sim: Simulator, ids: list[str]) -> None:
    """With CHAOS_KEEP=DIR, copy the daemon's log, file sink, state and the truth there."""
    keep = Path(os.environ["CHAOS_KEEP"])
    keep.mkdir(parents=True, exist_ok=True)
    for name in ("daemon.log", "replies.ndjson", "state.db"):
        if (work / name).exists():
            (keep / name).write_bytes((work / name).read_bytes())
    truth = {i: sim.conversation_json(i, limit=100)["messages"] for i in ids}
    (keep / "truth.json").write_text(json.dumps(truth, indent=1))


async def chaos(replies: int, kills: int, chats: int, seed: int, deadline_s: float, *, faults: bool) -> int:
    rng = random.Random(seed)
    sim = Simulator(SimConfig(token=TOKEN, seed=seed, fail_rate=0.1, cancel_rate=0.05, stall_s=3.0))
    for name, share in FAULTS.items() if faults else ():
        setattr(sim.config, name, share)
    base_url = await sim.start()
    receiver = Receiver()
    hook = await receiver.start()
    ids = [sim.create_chat(f"question {i}", reply_s=rng.uniform(0.2, 1.5)) for i in range(chats)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qawatch-chaos-") as tmp:
        work = Path(tmp)
        config = write_config(work, base_url, hook, ids)
        asked_all = asyncio.Event()
        driver = asyncio.create_task(
            drive(sim, ids, work / "replies.ndjson", replies=replies, rng=rng, done=asked_all)
        )
        with (work / "daemon.log").open("wb") as log:
            daemon = await start_daemon(config, work, log)
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.3, 2.0))
                daemon.send_signal(signal.SIGKILL)
                await daemon.wait()
                daemon = await start_daemon(config, work, log)
            await asked_all.wait()
            truth = await wait_delivered(
                sim, ids, receiver, work / "replies.ndjson", replies=replies, deadline=started + deadline_s
            )
            code = await stop_daemon(daemon, work / "daemon.log", kills + 1)
        await driver
        if os.environ.get("CHAOS_KEEP"):
            keep_for_post_mortem(work, sim, ids)
        verdicts = {
            "file": verdict(truth, file_hits(work / "replies.ndjson"), kills),
            "webhook": verdict(truth, receiver.hits, kills),
        }
    await receiver.stop()
    await sim.stop()
    for sink, r in verdicts.items():
        print(
            f"chaos: {sink}: {len(truth)} replies, {kills} kills: lost {r['lost']}, "
            f"repeated {r['repeated']}, under two ids {r['split']}"
        )
    print(f"chaos: {time.monotonic() - started:.1f} s, daemon exit on SIGTERM {code}")
    problems = [f"{sink}: {p}" for sink, r in verdicts.items() for p in r["problems"]]
    if len(truth) < replies:
        problems.append(f"only {len(truth)} of {replies} replies finished within --deadline")
    if code != 0:
        problems.append(f"the daemon exited {code} on SIGTERM")
    for problem in problems:
        print(f"chaos: FAIL {problem}")
    return 1 if problems else 0


def verdict(truth: set[str], hits: list[tuple[str, str]], kills: int) -> dict[str, Any]:
    by_message: dict[str, set[str]] = collections.defaultdict(set)
    counts = collections.Counter(event_id for event_id, _ in hits)
    for event_id, message in hits:
        by_message[message].add(event_id)
    lost = sorted(truth - set(by_message))
    repeated = sum(n - 1 for n in counts.values())
    split = sorted(m for m, events in by_message.items() if len(events) > 1)
    problems = []
    if lost:
        problems.append(f"{len(lost)} lost, e.g. {lost[:3]}")
    if split:
        problems.append(f"{len(split)} replies under two event ids, e.g. {split[:3]}")
    if repeated > kills:
        problems.append(f"{repeated} repeats for {kills} kills")
    return {"lost": len(lost), "repeated": repeated, "split": len(split), "problems": problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--chats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--faults", action="store_true", help="answer a share of GETs with every fault class")
    args = parser.parse_args()
    return asyncio.run(
        chaos(args.replies, args.kills, args.chats, args.seed, args.deadline, faults=args.faults)
    )


if __name__ == "__main__":
    sys.exit(main())
