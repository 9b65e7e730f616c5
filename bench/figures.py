"""The benchmark's phases: each starts its own simulator process and `qawatch run` process(es),
measures some of the issue's figures, and stops everything in ``finally``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from bench.daemonproc import Daemon, FileTail, histogram
from bench.procs import REPO, BenchError, cpu_s
from bench.simproc import SimProcess
from bench.stats import busiest_window, mean, percentile, seconds, worst_gap

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
SATURATE = {"rate_limit_per_s": 10_000.0, "max_concurrency": 32.0}  # the settings' maximum rate
UNLIMITED = {"rate_limit_per_s": 10_000.0}  # phases whose load must not meet the rate limit
JITTER = 0.1
SATURATION_ROUNDS = 3  # figures 1, 2: bare loop and daemon take turns this many times
LATE_TOLERANCE_S = 0.1  # figure 5: a poll counts as within its interval up to this late
STARTUP_S = 2.0  # figure 7: lateness is measured after this much of start-up (reported apart)


@dataclass(frozen=True)
class Sizes:
    """How big and long each phase is (``--quick``: smaller and shorter)."""

    saturation_watches: int = 20_000
    bare_seconds: float = 8.0
    warmup_s: float = 4.0
    window_s: float = 8.0
    scale_watches: int = 100_000
    scale_interval_s: float = 20.0
    even_watches: int = 20_000
    even_interval_s: float = 20.0
    detect_chats: int = 300
    burst_replies: int = 1_000
    pending_chats: int = 10_000
    limit_seconds: float = 12.0
    pacing_chats: int = 100
    replica_watches: int = 30_000
    start_timeout_s: float = 150.0


QUICK = Sizes(
    saturation_watches=5_000,
    bare_seconds=4.0,
    warmup_s=2.0,
    window_s=4.0,
    scale_watches=10_000,
    scale_interval_s=10.0,
    even_watches=5_000,
    even_interval_s=10.0,
    detect_chats=100,
    burst_replies=300,
    pending_chats=2_000,
    limit_seconds=6.0,
    pacing_chats=30,
    replica_watches=3_000,
    start_timeout_s=60.0,
)


@dataclass
class Row:
    """One line of the table: a figure, what was measured, its target, whether it was met."""

    fig: str
    name: str
    measured: str
    target: str
    met: bool | None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    sizes: Sizes
    workdir: Path
    token: str = "bench-token"  # the simulator's throwaway token
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # phases the harness could not measure

    def record(self, phase: str, values: dict[str, Any]) -> None:
        """Add ``values`` to what bench/results/latest.json says about ``phase``."""
        self.details.setdefault(phase, {}).update(values)


@contextlib.asynccontextmanager
async def sim_process(ctx: Context, phase: str) -> AsyncIterator[SimProcess]:
    """A simulator process for one phase; its non-200 answers are reported as problems."""
    sim = await SimProcess.start(ctx.token)
    try:
        yield sim
    finally:
        with contextlib.suppress(Exception):
            statuses = (await sim.stats())["statuses"]
            odd = {k: v for k, v in statuses.items() if k != "200"}
            if odd:
                ctx.problems.append(f"{phase}: the simulator answered non-200 statuses {odd}")
        await sim.close()


@contextlib.asynccontextmanager
async def daemon_process(
    ctx: Context, phase: str, sim: SimProcess, ids: list[str], **options: Any
) -> AsyncIterator[Daemon]:
    """A `qawatch run` (not started yet) for one phase; stopped and its log read at the end."""
    workdir = ctx.workdir / phase
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(workdir, sim.api, ctx.token, ids, **options)
    try:
        yield daemon
    finally:
        await daemon.stop()
        problems = daemon.problems()
        ctx.record(phase, {"daemon_log": problems})
        if problems["levels"]:
            ctx.problems.append(f"{phase}: daemon log {problems['levels']}: {'; '.join(problems['top'])}")
        if any(code != 0 for code in daemon.exit_codes):
            ctx.problems.append(f"{phase}: daemon exit codes after SIGTERM: {daemon.exit_codes}")


async def start_and_first_get(sim: SimProcess, daemon: Daemon, within_s: float) -> tuple[float, float]:
    """Reset the simulator's log, spawn the daemon; (spawn time, first GET time)."""
    await sim.reset()
    spawned = await daemon.start()
    first = await sim.first_get_after(spawned, daemon.dead, within_s)
    return spawned, first


async def sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def wait_seen(tail: FileTail, ids: list[str], deadline: float, daemon: Daemon) -> None:
    """Until every id has a line in the file; BenchError (replies lost) at ``deadline``."""
    while any(short_id not in tail.seen for short_id in ids):
        if time.time() > deadline:
            lost = sum(1 for short_id in ids if short_id not in tail.seen)
            raise BenchError(f"{lost} of {len(ids)} replies never reached the file sink")
        dead = daemon.dead()
        if dead is not None:
            raise BenchError(dead)
        await asyncio.sleep(0.05)
    if tail.repeats:
        raise BenchError(f"{tail.repeats} replies were written to the file twice")


# --------------------------------------------------------------------------- 1, 2: saturation


async def run_bare(
    ctx: Context, sim: SimProcess, prefix: str, count: int, *, uvloop: bool, seconds: float | None = None
) -> dict[str, Any]:
    """The bare loop in its own process against ``sim`` (see bench/bare.py)."""
    args = ["--base", sim.api, "--token", ctx.token, "--prefix", prefix, "--count", str(count)]
    args += ["--sim-pid", str(sim.pid), "--seconds", str(seconds or ctx.sizes.bare_seconds)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bare", *args, *(["--uvloop"] if uvloop else []),
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), ctx.sizes.bare_seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"the bare loop failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


async def _steady_daemon(ctx: Context, sim: SimProcess, daemon: Daemon) -> dict[str, Any]:
    """Start the daemon and wait for its steady state: every watch polled twice (a watch's
    first poll records its starting point, a durable commit; not what figure 1 is about)."""
    before = await sim.gets()  # the bare loops' GETs, on the same simulator
    spawned, first = await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
    event_loop = daemon.event_loop()
    await asyncio.sleep(ctx.sizes.warmup_s)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if await sim.gets() - before >= 2 * ctx.sizes.saturation_watches:
            break
        await asyncio.sleep(0.25)
    return {"event_loop": event_loop, "start_to_first_poll_s": first - spawned}


async def _daemon_window(sim: SimProcess, daemon: Daemon, seconds: float) -> dict[str, float]:
    t0, n0, d0, s0 = time.monotonic(), await sim.gets(), daemon.cpu_s(), cpu_s(sim.pid)
    await asyncio.sleep(seconds)
    t1, n1, d1, s1 = time.monotonic(), await sim.gets(), daemon.cpu_s(), cpu_s(sim.pid)
    return {"polls": n1 - n0, "seconds": t1 - t0, "cpu": d1 - d0, "sim_cpu": s1 - s0}


def _summed(windows: list[dict[str, float]]) -> dict[str, Any]:
    polls = max(1.0, sum(w["polls"] for w in windows))
    seconds = sum(w["seconds"] for w in windows)
    cpu, sim_cpu = sum(w["cpu"] for w in windows), sum(w["sim_cpu"] for w in windows)
    return {
        "polls": int(polls),
        "seconds": seconds,
        "rps": polls / seconds,
        "cpu_per_poll_us": 1e6 * cpu / polls,
        "cpu_share": cpu / seconds,
        "sim_cpu_per_request_us": 1e6 * sim_cpu / polls,
        "sim_cpu_share": sim_cpu / seconds,
        "rounds": len(windows),
    }


def _bare_summed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = max(1, sum(int(r["requests"]) for r in runs))
    seconds = sum(float(r["seconds"]) for r in runs)

    def weighted(key: str) -> float:
        return sum(float(r[key]) * int(r["requests"]) for r in runs) / requests

    return {
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds,
        "cpu_per_request_us": weighted("cpu_per_request_us"),
        "cpu_share": sum(float(r["cpu_share"]) * float(r["seconds"]) for r in runs) / seconds,
        "sim_cpu_per_request_us": weighted("sim_cpu_per_request_us"),
        "sim_cpu_share": sum(float(r["sim_cpu_share"]) * float(r["seconds"]) for r in runs) / seconds,
        "loop": runs[0]["loop"],
        "rounds": len(runs),
    }


async def phase_saturation(ctx: Context) -> list[Row]:
    """Figures 1 and 2, the bare loop (asyncio, and uvloop) and the simulator's ceiling.

    The machine's speed drifts (a shared host): the bare loop and the daemon take turns, in
    rounds, the daemon stopped (SIGSTOP) while the bare loop runs, so that each ratio compares
    the two over the same stretch of time."""
    n = ctx.sizes.saturation_watches
    poll = {"active_interval_s": 0.05, "idle_interval_s": 0.05, "jitter": 0.0}
    rounds = SATURATION_ROUNDS
    async with sim_process(ctx, "saturation") as sim:
        ids = await sim.create("s", n, "idle")
        bare_uv = await run_bare(ctx, sim, "s", n, uvloop=True) if have_uvloop() else None
        async with daemon_process(ctx, "saturation", sim, ids, poll=poll, api=SATURATE) as daemon:
            steady = await _steady_daemon(ctx, sim, daemon)
            bares: list[dict[str, Any]] = []
            windows: list[dict[str, float]] = []
            for _ in range(rounds):
                assert daemon.proc is not None
                daemon.proc.send_signal(signal.SIGSTOP)
                try:
                    bares.append(
                        await run_bare(
                            ctx, sim, "s", n, uvloop=False, seconds=ctx.sizes.bare_seconds / rounds
                        )
                    )
                finally:
                    daemon.proc.send_signal(signal.SIGCONT)
                await asyncio.sleep(1.0)  # the backlog of polls due while it was stopped
                windows.append(await _daemon_window(sim, daemon, ctx.sizes.window_s / rounds))
    bare = _bare_summed(bares)
    qawatch = {**steady, **_summed(windows)}
    ctx.record(
        "saturation",
        {
            "watches": n,
            "poll": poll,
            "bare": bare,
            "bare_rounds": bares,
            "bare_uvloop": bare_uv,
            "qawatch": qawatch,
            "qawatch_rounds": windows,
        },
    )
    return _saturation_rows(bare, bare_uv, qawatch, n)


def _saturation_rows(
    bare: dict[str, Any], bare_uv: dict[str, Any] | None, qawatch: dict[str, Any], n: int
) -> list[Row]:
    ratio = qawatch["cpu_per_poll_us"] / bare["cpu_per_request_us"]
    share = qawatch["rps"] / bare["rps"]
    rows = [
        Row(
            "0",
            "bare aiohttp loop (asyncio, json), concurrency 32",
            f"{bare['rps']:,.0f} req/s, {bare['cpu_per_request_us']:.0f} µs CPU/req "
            f"({bare['cpu_share']:.2f} cores)",
            "baseline",
            None,
            bare,
        )
    ]
    if bare_uv is not None:
        rows.append(
            Row(
                "0",
                f"bare loop under uvloop (info: qawatch ran on {qawatch['event_loop']})",
                f"{bare_uv['rps']:,.0f} req/s, {bare_uv['cpu_per_request_us']:.0f} µs CPU/req",
                "info",
                None,
                bare_uv,
            )
        )
    costs = [bare["sim_cpu_per_request_us"], qawatch["sim_cpu_per_request_us"]]
    cost = min(costs)
    ceiling = 1e6 / cost
    highest = max(bare["rps"], qawatch["rps"], bare_uv["rps"] if bare_uv else 0.0)
    rows.append(
        Row(
            "sim",
            "simulator ceiling (its CPU per GET, one core)",
            f"{cost:.0f} µs/GET -> {ceiling:,.0f} GET/s per core "
            f"(busiest use {max(bare['sim_cpu_share'], qawatch['sim_cpu_share']):.2f} cores)",
            "≥ 2 x fastest rate measured",
            ceiling >= 2 * highest,
            {"sim_cpu_per_request_us": costs, "ceiling_rps": ceiling},
        )
    )
    uv_note = (
        f"; vs uvloop bare {qawatch['cpu_per_poll_us'] / bare_uv['cpu_per_request_us']:.2f}"
        if bare_uv
        else ""
    )
    rows.append(
        Row(
            "1",
            "CPU per poll of qawatch ÷ CPU per request of the bare loop",
            f"{ratio:.2f} ({qawatch['cpu_per_poll_us']:.0f} µs/poll on {qawatch['event_loop']}, "
            f"{qawatch['cpu_share']:.2f} cores{uv_note})",
            "≤ 1.0",
            ratio <= 1.0,
            {"ratio": ratio},
        )
    )
    rows.append(
        Row(
            "2",
            f"polls/s at saturation ({n:,} watches, 0.05 s interval) vs bare loop",
            f"{qawatch['rps']:,.0f} vs {bare['rps']:,.0f} ({share:.2f}x)",
            "≥ 0.9 x bare",
            share >= 0.9,
            {"share": share},
        )
    )
    return rows


# --------------------------------------------------------------------------- 3, 4, 5: 100,000 watches


def coverage(
    log: dict[str, list[float]], ids: list[str], start: float, end: float, bound: float
) -> dict[str, Any]:
    """Figure 5: the watches whose every stretch of ``[start, end]`` without a poll (the first
    poll after ``start``, every gap between polls, the last poll to ``end``) is within ``bound``."""
    ok = first_in = 0
    worst = 0.0
    for short_id in ids:
        times = log.get(short_id, [])
        gap = worst_gap(times, start, end)
        worst = max(worst, gap)
        ok += gap <= bound
        first_in += bool(times) and times[0] <= start + bound
    return {"ok": ok, "first_in_first_interval": first_in, "worst_gap_s": worst, "bound_s": bound}


async def phase_scale(ctx: Context) -> list[Row]:
    """Figures 3, 4 and 5: 100,000 idle watches at a 20 s interval, then a restart."""
    n, interval = ctx.sizes.scale_watches, ctx.sizes.scale_interval_s
    poll = {"active_interval_s": interval, "idle_interval_s": interval, "jitter": JITTER}
    bound = interval * (1 + JITTER) + LATE_TOLERANCE_S
    async with sim_process(ctx, "scale") as sim:
        ids = await sim.create("w", n, "idle")
        async with daemon_process(ctx, "scale", sim, ids, poll=poll, api=SATURATE) as daemon:
            spawned, t0 = await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            end = t0 + 2 * interval * (1 + JITTER) + 1.0
            await sleep_until(end)
            memory = daemon.memory_kib()
            log = await sim.log("w")
            stop_code = await daemon.stop(60.0)
            restarted, t1 = await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            await asyncio.sleep(1.0)
            memory_after_restart = daemon.memory_kib()
    cover = coverage(log, ids, t0, end, bound)
    polls = sum(len(v) for v in log.values())
    detail = {
        "watches": n,
        "poll": poll,
        "first_start_to_first_poll_s": t0 - spawned,
        "restart_to_first_poll_s": t1 - restarted,
        "memory_kib": memory,
        "memory_after_restart_kib": memory_after_restart,
        "polls": polls,
        "window_s": end - t0,
        "coverage": cover,
        "stop_exit_code": stop_code,
    }
    ctx.record("scale", detail)
    rss_mb = memory["VmRSS"] * 1024 / 1e6  # the target is in MB (10^6 bytes)
    peak_mb = memory["VmHWM"] * 1024 / 1e6
    startup = t1 - restarted
    share = cover["ok"] / n
    return [
        Row(
            "3",
            f"RSS with {n:,} idle watches (after {end - t0:.0f} s of polling)",
            f"{rss_mb:.0f} MB = {memory['VmRSS'] / 1024:.0f} MiB (peak {peak_mb:.0f} MB)",
            "≤ 150 MB",
            rss_mb <= 150,
        ),
        Row(
            "4",
            f"start-up to first poll, {n:,} watches in the store",
            f"{seconds(startup)} (first start, syncing them from the watch file: {seconds(t0 - spawned)})",
            "≤ 2 s",
            startup <= 2.0,
        ),
        Row(
            "5",
            f"{n:,} watches, {interval:.0f} s interval ±10%: polled within every interval",
            f"{100 * share:.1f}% ({cover['first_in_first_interval']:,} in the first; "
            f"worst gap {cover['worst_gap_s']:.1f} s, bound {bound:.1f} s; needs {n / interval:,.0f} "
            f"polls/s, did {polls / (end - t0):,.0f}/s)",
            "100%",
            cover["ok"] == n,
        ),
    ]


# --------------------------------------------------------------------------- 6, 7: evenness, lateness


def lateness(buckets: list[tuple[float, float]]) -> dict[str, float] | None:
    """p99 bucket bound and share ≤ 20 ms of the lateness histogram; None without one."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    within = next((count for le, count in buckets if math.isclose(le, 0.02)), math.nan)
    p99 = next(le for le, count in buckets if count >= 0.99 * total)
    return {"polls": total, "share_within_20ms": within / total, "p99_bound_s": p99}


async def phase_evenness(ctx: Context) -> list[Row]:
    """Figures 6 and 7: 20,000 watches at a 20 s interval (under capacity)."""
    n, interval = ctx.sizes.even_watches, ctx.sizes.even_interval_s
    poll = {"active_interval_s": interval, "idle_interval_s": interval, "jitter": JITTER}
    async with sim_process(ctx, "evenness") as sim:
        ids = await sim.create("e", n, "idle")
        async with daemon_process(ctx, "evenness", sim, ids, poll=poll, api=SATURATE) as daemon:
            _, t0 = await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            await sleep_until(t0 + STARTUP_S)
            early = await daemon.metrics()
            await sleep_until(t0 + interval + 2.0)
            samples = await daemon.metrics()
            log = await sim.log("e")
    firsts = sorted(times[0] for times in log.values() if times)
    in_first = [t for t in firsts if t < t0 + interval]
    busiest = busiest_window(in_first)
    ratio = busiest / (n / interval)
    whole = histogram(samples, "qawatch_poll_lateness_seconds")
    begin = dict(histogram(early, "qawatch_poll_lateness_seconds"))
    # under capacity: after start-up (loading the watch set competes with the first polls)
    late = lateness([(le, count - begin.get(le, 0.0)) for le, count in whole])
    at_start = lateness(list(begin.items()))
    rate = sum(len(v) for v in log.values()) / (interval + 2.0)
    ctx.record(
        "evenness",
        {
            "watches": n,
            "poll": poll,
            "busiest_1s": busiest,
            "first_polls_in_interval": len(in_first),
            "lateness": late,
            "lateness_first_s": at_start,
        },
    )
    if late is None:
        late_row = Row(
            "7",
            "poll lateness p99 (start - due), under capacity",
            "n/a (no qawatch_poll_lateness_seconds)",
            "≤ 20 ms",
            None,
        )
    else:
        start_note = (
            f"; first {STARTUP_S:g} s: {100 * at_start['share_within_20ms']:.0f}% ≤ 20 ms of "
            f"{at_start['polls']:,.0f}, p99 ≤ {1000 * at_start['p99_bound_s']:g} ms"
            if at_start
            else ""
        )
        late_row = Row(
            "7",
            f"poll lateness p99 (start - due), {rate:,.0f} polls/s, after the first {STARTUP_S:g} s",
            f"p99 ≤ {1000 * late['p99_bound_s']:g} ms (bucket bound); {100 * late['share_within_20ms']:.1f}% "
            f"≤ 20 ms of {late['polls']:,.0f}{start_note}",
            "≤ 20 ms",
            late["p99_bound_s"] <= 0.02,
        )
    return [
        Row(
            "6",
            f"evenness of first polls, {n:,} watches over {interval:.0f} s (busiest 1 s ÷ mean)",
            f"{ratio:.2f} (busiest {busiest:,}/s, mean {n / interval:,.0f}/s; "
            f"{len(in_first):,} first polls in the interval)",
            "≤ 1.2",
            ratio <= 1.2,
        ),
        late_row,
    ]


# --------------------------------------------------------------------------- 8, 10: detection


def _schedule_posts(
    ids: list[str], rng: random.Random, start: float, spread: float, reply: tuple[float, float]
) -> list[tuple[str, float, float, float]]:
    return [(short_id, start + rng.uniform(0, spread), rng.uniform(*reply), 0.7) for short_id in ids]


async def phase_detection(ctx: Context) -> list[Row]:
    """Figure 8: replies of 8-12 s finishing at random times; file line minus reply end."""
    n, interval = ctx.sizes.detect_chats, 1.0
    poll = {"active_interval_s": interval, "jitter": JITTER}
    async with sim_process(ctx, "detection") as sim:
        ids = await sim.create("d", n, "empty")
        async with daemon_process(
            ctx, "detection", sim, ids, poll=poll, api=UNLIMITED, backfill="latest"
        ) as daemon:
            await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            tail = FileTail(daemon.sink)
            tail.start()
            try:
                posts = _schedule_posts(ids, random.Random(8), time.time() + 1.0, 8.0, (8.0, 12.0))
                await sim.post(posts)
                await wait_seen(tail, ids, max(at + d for _, at, d, _ in posts) + 20.0, daemon)
            finally:
                await tail.stop()
            posted = await sim.posted()
    delays = [tail.seen[short_id] - posted[short_id][1] for short_id in ids]
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    t50, t99 = interval / 2 + 0.02, interval + 0.1
    ctx.record("detection", {"replies": n, "poll": poll, "p50_s": p50, "p99_s": p99, "max_s": max(delays)})
    return [
        Row(
            "8",
            f"detection delay p50 / p99 ({n} replies; active interval {interval:g} s, jitter {JITTER:g})",
            f"{seconds(p50)} / {seconds(p99)} (max {seconds(max(delays))})",
            f"≤ {t50:.2f} s / ≤ {t99:.2f} s",
            p50 <= t50 and p99 <= t99,
        )
    ]


async def phase_burst(ctx: Context) -> list[Row]:
    """Figure 10: 1,000 replies finishing within one wall-clock second."""
    n = ctx.sizes.burst_replies
    poll = {"active_interval_s": 1.0, "jitter": JITTER}
    rng = random.Random(10)
    async with sim_process(ctx, "burst") as sim:
        ids = await sim.create("b", n, "empty")
        async with daemon_process(
            ctx, "burst", sim, ids, poll=poll, api=UNLIMITED, backfill="latest"
        ) as daemon:
            await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            second = math.floor(time.time()) + 19.0
            posts = []
            for short_id in ids:
                reply_s = rng.uniform(12.0, 15.0)
                posts.append((short_id, second + rng.uniform(0.0, 0.999) - reply_s, reply_s, 0.7))
            tail = FileTail(daemon.sink)
            tail.start()
            try:
                await sim.post(posts)
                await wait_seen(tail, ids, second + 30.0, daemon)
            finally:
                await tail.stop()
            posted = await sim.posted()
    ends = [posted[short_id][1] for short_id in ids]
    last = max(tail.seen.values()) - (second + 1.0)
    worst = max(tail.seen[short_id] - posted[short_id][1] for short_id in ids)
    ctx.record(
        "burst",
        {
            "replies": n,
            "poll": poll,
            "ends_span_s": max(ends) - min(ends),
            "last_line_after_second_s": last,
            "worst_reply_delay_s": worst,
        },
    )
    return [
        Row(
            "10",
            f"{n:,} replies finishing in one second -> all lines in the file (active 1 s)",
            f"{seconds(last)} after that second (worst reply {seconds(worst)} after its end)",
            "≤ 2 s",
            last <= 2.0,
        )
    ]


# --------------------------------------------------------------------------- 9: rate limit


async def phase_rate_limit(ctx: Context) -> list[Row]:
    """Figure 9: 10,000 pending conversations under api.rate_limit_per_s 50."""
    n, limit = ctx.sizes.pending_chats, 50.0
    async with sim_process(ctx, "rate_limit") as sim:
        ids = await sim.create("r", n, "pending", reply_s=3600.0)
        async with daemon_process(
            ctx, "rate_limit", sim, ids, poll={}, api={"rate_limit_per_s": limit}
        ) as daemon:
            _, t0 = await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            end = t0 + ctx.sizes.limit_seconds
            await sleep_until(end + 0.5)
            log = await sim.log("r")
    times = sorted(t for v in log.values() for t in v if t <= end)
    busiest = busiest_window(times)
    steady = [t for t in times if t >= t0 + 2.0]
    rate = len(steady) / (end - t0 - 2.0)
    steady_busiest = busiest_window(steady)
    ctx.record(
        "rate_limit",
        {
            "pending": n,
            "busiest_1s": busiest,
            "steady_busiest_1s": steady_busiest,
            "mean_per_s": rate,
        },
    )
    return [
        Row(
            "9",
            f"rate limit 50/s, {n:,} pending: busiest 1 s (sliding) / mean",
            f"{busiest} / {rate:.1f} per s (after the first 2 s: busiest {steady_busiest})",
            "≤ 50, mean ≥ 48",
            busiest <= limit and rate >= 48,
        )
    ]


# --------------------------------------------------------------------------- 11: pacing


async def fixed_loop(
    session: aiohttp.ClientSession, url: str, start: float, period: float, deadline: float
) -> tuple[int, float | None]:
    """A client that GETs every ``period`` s from ``start`` until the newest message is a
    finished reply: (requests, wall time it knew), or None at ``deadline``."""
    await sleep_until(start)
    requests = 0
    while time.time() < deadline:
        async with session.get(url) as resp:
            body = await resp.json()
        requests += 1
        messages = body.get("messages") or [{}]
        if messages[0].get("role") == "assistant" and messages[0].get("status") in TERMINAL:
            return requests, time.time()
        await asyncio.sleep(period)
    return requests, None


def _pacing_row(name: str, requests: list[int], delays: list[float], target: str, met: bool | None) -> Row:
    per_reply = mean(requests)
    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    return Row(
        "11",
        name,
        f"{per_reply:.1f} req/reply, delay p50 {seconds(p50)} / p95 {seconds(p95)}",
        target,
        met,
        {"requests_per_reply": per_reply, "p50_s": p50, "p95_s": p95, "replies": len(delays)},
    )


async def phase_pacing(ctx: Context) -> list[Row]:
    """Figure 11: replies of 20-60 s; qawatch's defaults (two streaming shares) beside clients
    polling every 20 s, 5 s and 3 s, each on its own chats with the same reply schedule."""
    n = ctx.sizes.pacing_chats
    rng = random.Random(11)
    schedule = [(rng.uniform(0.0, 5.0), rng.uniform(20.0, 60.0)) for _ in range(n)]
    shares = {"q2": 0.2, "q7": 0.7}
    periods = {"f20": 20.0, "f5": 5.0, "f3": 3.0}
    async with sim_process(ctx, "pacing") as sim:
        groups = {prefix: await sim.create(prefix, n, "empty") for prefix in [*shares, *periods]}
        watched = groups["q2"] + groups["q7"]
        async with daemon_process(
            ctx, "pacing", sim, watched, poll={}, api={"rate_limit_per_s": 1000.0}, backfill="latest"
        ) as daemon:
            await start_and_first_get(sim, daemon, ctx.sizes.start_timeout_s)
            base = time.time() + 2.0
            posts = [
                (short_id, base + offset, reply_s, shares.get(prefix, 0.2))
                for prefix, ids in groups.items()
                for short_id, (offset, reply_s) in zip(ids, schedule, strict=True)
            ]
            await sim.post(posts)
            deadline = base + 5.0 + 60.0 + 25.0
            tail = FileTail(daemon.sink)
            tail.start()
            try:
                headers = {"Authorization": f"Bearer {ctx.token}"}
                async with aiohttp.ClientSession(headers=headers) as session:
                    loops = {
                        prefix: asyncio.gather(
                            *[
                                fixed_loop(
                                    session,
                                    f"{sim.api}/v1/chat/{short_id}?limit=20",
                                    base + offset + 0.01,
                                    period,
                                    deadline,
                                )
                                for short_id, (offset, _) in zip(groups[prefix], schedule, strict=True)
                            ]
                        )
                        for prefix, period in periods.items()
                    }
                    fixed = {prefix: await task for prefix, task in loops.items()}
                await wait_seen(tail, watched, deadline, daemon)
            finally:
                await tail.stop()
            posted = await sim.posted()
            log = await sim.log("q")
    return _pacing_rows(
        ctx,
        groups=groups,
        shares=shares,
        periods=periods,
        fixed=fixed,
        seen=tail.seen,
        posted=posted,
        log=log,
    )


def _pacing_rows(
    ctx: Context,
    *,
    groups: dict[str, list[str]],
    shares: dict[str, float],
    periods: dict[str, float],
    fixed: dict[str, list[tuple[int, float | None]]],
    seen: dict[str, float],
    posted: dict[str, tuple[float, float]],
    log: dict[str, list[float]],
) -> list[Row]:
    results: dict[str, tuple[list[int], list[float]]] = {}
    for prefix in shares:
        requests = [sum(1 for t in log.get(i, []) if posted[i][0] <= t <= seen[i]) for i in groups[prefix]]
        results[prefix] = (requests, [seen[i] - posted[i][1] for i in groups[prefix]])
    for prefix, period in periods.items():
        pairs = list(zip(groups[prefix], fixed[prefix], strict=True))
        if any(known is None for _, (_, known) in pairs):
            raise BenchError(f"a fixed {period:g} s loop did not see its reply finish")
        results[prefix] = (
            [r for _, (r, _) in pairs],
            [known - posted[i][1] for i, (_, known) in pairs if known is not None],
        )
    ctx.record("pacing", {k: {"requests": v[0], "delays": v[1]} for k, v in results.items()})
    loop3 = results["f3"]
    rows = []
    for prefix, share in shares.items():
        requests, delays = results[prefix]
        met = (
            percentile(delays, 0.5) < percentile(loop3[1], 0.5)
            and percentile(delays, 0.95) < percentile(loop3[1], 0.95)
            and mean(requests) < mean(loop3[0])
        )
        default = " (the simulator's default)" if share == 0.7 else ""
        rows.append(
            _pacing_row(
                f"qawatch default pacing, replies stream the last {share:.0%}{default}",
                requests,
                delays,
                "delay p50/p95 < 3 s loop's, fewer requests",
                met,
            )
        )
    for prefix, period in periods.items():
        requests, delays = results[prefix]
        rows.append(_pacing_row(f"fixed {period:g} s polling", requests, delays, "reference", None))
    return rows


# --------------------------------------------------------------------------- 12: replicas

REPLICAS = 3
REPLICA_TTL_S = 5.0
REPLICA_WINDOW_S = 8.0
REPLICA_INTERVAL_S = 30.0


def _pgserver(*args: str) -> subprocess.CompletedProcess[str]:
    """tests/pgserver.py as a script: the same throwaway cluster the tests use."""
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "pgserver.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _holders(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        try:
            rows = conn.execute(
                "SELECT holder, COUNT(*) FROM watches"
                " WHERE state = 'active' AND holder IS NOT NULL GROUP BY holder"
            )
        except psycopg.errors.UndefinedTable:
            return {}
        return {str(holder): int(n) for holder, n in rows.fetchall()}


def _transactions(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        return int(row[0]) if row else 0


async def _until(predicate: Callable[[], bool], within_s: float, what: str) -> float:
    """Seconds until ``predicate`` holds (checked every 0.2 s); BenchError after ``within_s``."""
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > within_s:
            raise BenchError(f"replicas: {what} did not happen within {within_s:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def phase_replicas(ctx: Context) -> list[Row]:
    """Figure 12 (issue 11): 3 replicas and 30,000 watches on one PostgreSQL: each one's
    share, CPU and database transactions per poll, takeover after a kill -9."""
    n = ctx.sizes.replica_watches
    if _pgserver("bindir").returncode != 0:
        return [
            Row("12", "3 replicas on one PostgreSQL", "skipped: no PostgreSQL server binaries", "-", None)
        ]
    # not under the bench's private folder: the cluster runs as the postgres user
    root = Path(tempfile.mkdtemp(prefix="qawatch-bench-pg-"))
    started = _pgserver("start", str(root))
    if started.returncode != 0:
        raise BenchError(f"replicas: the PostgreSQL cluster did not start: {started.stderr[-300:]}")
    url = started.stdout.strip().splitlines()[-1]
    interval = REPLICA_INTERVAL_S
    poll = {"active_interval_s": interval, "idle_interval_s": interval, "jitter": JITTER}
    state = {"url": url, "lease_ttl_s": REPLICA_TTL_S}
    try:
        async with sim_process(ctx, "replicas") as sim:
            ids = await sim.create("r", n, "idle")
            async with contextlib.AsyncExitStack() as stack:
                daemons = [
                    await stack.enter_async_context(
                        daemon_process(ctx, f"replica-{i}", sim, ids, poll=poll, api=UNLIMITED, state=state)
                    )
                    for i in range(REPLICAS)
                ]
                for daemon in daemons:
                    await daemon.start()
                spread_s = await _until(
                    lambda: len(h := _holders(url)) == REPLICAS and sum(h.values()) == n,
                    120,
                    "an even spread",
                )
                shares = sorted(_holders(url).values())
                # steady state: every watch polled once (that first poll commits its starting
                # point); the window then sees quiet polls, as figure 1 does
                await asyncio.sleep(interval * (1 + JITTER) + 2.0)
                cpu0, gets0, tx0 = sum(d.cpu_s() for d in daemons), await sim.gets(), _transactions(url)
                await asyncio.sleep(REPLICA_WINDOW_S)
                cpu1, gets1, tx1 = sum(d.cpu_s() for d in daemons), await sim.gets(), _transactions(url)
                polls = max(1, gets1 - gets0)
                victim = daemons[0]
                assert victim.proc is not None
                victim.proc.kill()
                await victim.proc.wait()
                victim.proc = None  # killed on purpose: not a problem to report at the end
                takeover_s = await _until(
                    lambda: len(h := _holders(url)) == REPLICAS - 1 and sum(h.values()) == n,
                    REPLICA_TTL_S * 4 + 30,
                    "the takeover",
                )
                after = sorted(_holders(url).values())
    finally:
        _pgserver("stop", str(root))
    cpu_us = 1e6 * (cpu1 - cpu0) / polls
    tx_per_poll = (tx1 - tx0) / polls
    sqlite_us = ctx.details.get("saturation", {}).get("qawatch", {}).get("cpu_per_poll_us")
    ctx.record(
        "replicas",
        {
            "watches": n,
            "replicas": REPLICAS,
            "lease_ttl_s": REPLICA_TTL_S,
            "shares": shares,
            "spread_s": spread_s,
            "polls_per_s": polls / REPLICA_WINDOW_S,
            "cpu_per_poll_us": cpu_us,
            "transactions_per_poll": tx_per_poll,
            "takeover_s": takeover_s,
            "shares_after_kill": after,
        },
    )
    fair = n / REPLICAS
    beside = f"; SQLite, figure 1: {sqlite_us:.0f} µs" if sqlite_us else ""
    return [
        Row(
            "12",
            f"{REPLICAS} replicas, {n:,} watches on one PostgreSQL: watches held by each",
            f"{' / '.join(f'{x:,}' for x in shares)} (spread {spread_s:.1f} s after start)",
            "about 1/3 each",
            max(abs(x - fair) for x in shares) <= 0.05 * fair,
        ),
        Row(
            "12",
            f"takeover after kill -9 of a replica (lease_ttl_s {REPLICA_TTL_S:g})",
            f"{takeover_s:.1f} s until the others held all {n:,} ({' / '.join(f'{x:,}' for x in after)})",
            f"≤ TTL + 1.5 s ({REPLICA_TTL_S + 1.5:.1f} s)",
            takeover_s <= REPLICA_TTL_S + 1.5,
        ),
        Row(
            "12",
            f"CPU and database transactions per poll ({polls / REPLICA_WINDOW_S:,.0f} polls/s in all)",
            f"{cpu_us:.0f} µs/poll (the 3 replicas' CPU){beside}; {tx_per_poll:.3f} transactions/poll",
            "reported",
            None,
        ),
    ]
