"""`make bench`: the issue's figures 1-11 measured on this machine, printed as a table with
their targets and written to bench/results/latest.json.

Every phase runs the simulator in its own process (bench/simproc.py), the daemon as a real
`qawatch run` process with a file sink, and reads CPU and memory from /proc. Exit 0 when the
harness worked (a missed target is a measurement), 1 when it failed (a process did not start,
replies were lost).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.figures import (
    QUICK,
    Context,
    Row,
    Sizes,
    have_uvloop,
    phase_burst,
    phase_detection,
    phase_evenness,
    phase_pacing,
    phase_rate_limit,
    phase_replicas,
    phase_saturation,
    phase_scale,
)
from bench.procs import REPO, BenchError, machine

Phase = Callable[[Context], Awaitable[list[Row]]]

#: phase name -> (figures it measures, the phase)
PHASES: dict[str, tuple[tuple[int, ...], Phase]] = {
    "saturation": ((1, 2), phase_saturation),
    "scale": ((3, 4, 5), phase_scale),
    "evenness": ((6, 7), phase_evenness),
    "burst": ((10,), phase_burst),
    "detection": ((8,), phase_detection),
    "rate_limit": ((9,), phase_rate_limit),
    "pacing": ((11,), phase_pacing),
    "replicas": ((12,), phase_replicas),
}
#: stages run one after another; the phases of a stage at the same time. Figure 11 waits for
#: 20-60 s replies at a few requests per second: it runs beside the light phases 8 and 9.
STAGES: tuple[tuple[str, ...], ...] = (
    ("saturation",),
    ("scale",),
    ("evenness",),
    ("burst",),
    ("pacing", "detection", "rate_limit", "replicas"),
)
#: within a stage, these run one after another (beside the others)
SEQUENTIAL = {"detection", "rate_limit", "replicas"}
#: how each figure is measured, printed under the table
NOTES: dict[int, str] = {
    12: "12: 3 `qawatch run` replicas on one throwaway PostgreSQL cluster (tests/pgserver.py), 30,000 "
    "idle watches at 30 s, lease_ttl_s 5; CPU of the 3 replicas over 8 s of the second interval "
    "(quiet polls, as in figure 1) ÷ GETs at the simulator; transactions from pg_stat_database; "
    "takeover = kill -9 of one replica -> the others hold every watch (checked every 0.2 s); "
    "runs beside figure 11",
    1: "1, 2: idle watches (a finished reply, backfill none) polled every 0.05 s, jitter 0, "
    "api.rate_limit_per_s 10,000 (the maximum), max_concurrency 32; polls counted at the simulator "
    "once every watch was polled twice; the bare loop and the daemon take turns in 3 rounds (the daemon "
    "stopped with SIGSTOP while the bare loop runs), so both see the same stretch of the machine's "
    "drifting speed; CPU = utime + stime from /proc (all threads)",
    3: "3, 4, 5: idle watches, active = idle interval, jitter 0.1; RSS = VmRSS after two intervals; "
    "start-up = spawn of the second `qawatch run` on the same store -> first GET at the simulator",
    5: "5: a watch counts when no stretch without a poll (first GET -> its first poll, between polls, "
    "last poll -> end of two intervals) is longer than interval x 1.1 + 0.1 s",
    6: "6, 7: the first poll of each watch, busiest sliding 1 s ÷ watches/interval; lateness from "
    "qawatch_poll_lateness_seconds on /metrics (p99 as its bucket bound), counted from 2 s after the "
    "first poll (the first 2 s, while the watch set loads, are shown apart)",
    8: "8, 10: poll.active_interval_s 1, jitter 0.1, other poll settings default; replies stream the last "
    "70%; delay = the line seen in the file sink (5 ms tail) - the reply's end at the simulator",
    9: "9: pending replies (no assistant message yet), default poll settings; every GET at the simulator",
    11: "11: each row on its own chats with the same schedule (replies of 20-60 s starting over 5 s); "
    "qawatch with default poll settings (api.rate_limit_per_s 1,000 so the limit plays no part); "
    "its requests counted from the post to the line in the file; runs beside figures 8 and 9",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", help="figures to measure, e.g. 1,2 or 8 (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter phases, for iterating")
    parser.add_argument("--serial", action="store_true", help="never run two phases at the same time")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    if args.only:
        try:
            args.figures = {int(part) for part in args.only.split(",") if part.strip()}
        except ValueError:
            parser.error(f"--only: figure numbers separated by commas, not {args.only!r}")
        if not args.figures <= set(range(1, 13)):
            parser.error("--only: figures are 1 to 12")
    else:
        args.figures = set(range(1, 13))
    return args


def plan(figures: set[int], serial: bool) -> list[list[list[str]]]:
    """Stages -> concurrent lanes -> phases run one after another in a lane."""
    wanted = {name for name, (figs, _) in PHASES.items() if figures & set(figs)}
    stages: list[list[list[str]]] = []
    for stage in STAGES:
        names = [name for name in stage if name in wanted]
        if serial:
            stages.extend([[name]] for name in names)
            continue
        lanes = [[name] for name in names if name not in SEQUENTIAL]
        sequential = [name for name in names if name in SEQUENTIAL]
        if sequential:
            lanes.append(sequential)
        if lanes:
            stages.append(lanes)
    return stages


async def run_phase(ctx: Context, name: str) -> list[Row]:
    """One phase; a harness failure becomes rows that say so (and is remembered)."""
    figs, phase = PHASES[name]
    started = time.monotonic()
    print(f"bench: {name} (figure {', '.join(map(str, figs))}) ...", file=sys.stderr, flush=True)
    try:
        rows = await phase(ctx)
    except Exception as exc:  # noqa: BLE001 - a failed phase is reported, and the others still run
        detail = str(exc) if isinstance(exc, BenchError) else traceback.format_exc(limit=4)
        ctx.problems.append(f"{name}: HARNESS FAILED: {detail}")
        ctx.failed.append(name)
        ctx.record(name, {"failed": detail})
        return [Row(str(fig), name, "FAILED (see problems)", "-", None, {"failed": True}) for fig in figs]
    took = time.monotonic() - started
    ctx.record(name, {"seconds": took})
    print(f"bench: {name} done in {took:.0f} s", file=sys.stderr, flush=True)
    return rows


async def run_lane(ctx: Context, names: list[str]) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        rows += await run_phase(ctx, name)
    return rows


async def run_all(ctx: Context, stages: list[list[list[str]]]) -> list[Row]:
    rows: list[Row] = []
    for lanes in stages:
        for lane_rows in await asyncio.gather(*(run_lane(ctx, lane) for lane in lanes)):
            rows += lane_rows
    return rows


def _order(row: Row) -> tuple[int, str]:
    return (int(row.fig) if row.fig.isdigit() else 0, row.fig)


def table(rows: list[Row]) -> str:
    """The figures as a plain-text table: # | figure | measured | target | met?"""
    header = ("#", "figure", "measured", "target", "met?")
    lines = [
        (row.fig, row.name, row.measured, row.target, {True: "yes", False: "NO", None: "-"}[row.met])
        for row in sorted(rows, key=_order)
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    rule = "-+-".join("-" * width for width in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes: Sizes = QUICK if args.quick else Sizes()
    info = machine()
    info["uvloop"] = "yes" if have_uvloop() else "no"
    started, clock0 = datetime.now(UTC), time.monotonic()
    print(
        f"bench: {info['cpu']}, {info['cores']} cores, Python {info['python']}, uvloop {info['uvloop']}"
        f"{', --quick' if args.quick else ''}",
        file=sys.stderr,
    )
    # byte-compile the package first, as `pip install` does for an installed one: start-up
    # (figure 4) measures the daemon, not the compiler (an editable install compiles on import,
    # and not even once when PYTHONDONTWRITEBYTECODE is set)
    compileall.compile_dir(REPO / "daemon", quiet=1)
    with tempfile.TemporaryDirectory(prefix="qawatch-bench-") as tmp:
        ctx = Context(sizes=sizes, workdir=Path(tmp))
        rows = asyncio.run(run_all(ctx, plan(args.figures, args.serial)))
    elapsed = time.monotonic() - clock0
    failed = bool(ctx.failed)
    print()
    print(
        f"qawatch bench: {info['cpu']} · {info['cores']} cores · Python {info['python']} · "
        f"uvloop {info['uvloop']} · {elapsed:.0f} s{' · --quick' if args.quick else ''}"
    )
    print(table(rows))
    measured = {int(row.fig) for row in rows if row.fig.isdigit()}
    notes = [note for fig, note in NOTES.items() if fig in measured]
    if notes:
        print("\nhow:")
        for note in notes:
            print(f"- {note}")
    if ctx.problems:
        print("\nproblems:")
        for problem in ctx.problems:
            print(f"- {problem}")
    else:
        print("\nno problems: every daemon log clean at level warning, every exit 0, every GET a 200")
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": info,
        "quick": args.quick,
        "figures": sorted(args.figures),
        "rows": [vars(row) for row in sorted(rows, key=_order)],
        "phases": ctx.details,
        "problems": ctx.problems,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwritten to {args.out}")
    return 1 if failed else 0
