"""Durations on the command line (`--timeout 30s`, `--since 2h`), against a reference model."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import qawatch_async

from daemon.durations import parse_duration
from daemon.events import shown_time
from daemon.simulator import Simulator

SECONDS_PER = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(
    amount=st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False, allow_infinity=False),
    unit=st.sampled_from(sorted(SECONDS_PER)),
    spaces=st.sampled_from(["", " "]),
)
def test_a_number_with_an_optional_unit_is_that_many_seconds(amount: Decimal, unit: str, spaces: str) -> None:
    text = f"{spaces}{amount.normalize():f}{spaces}{unit}{spaces}"
    assert parse_duration(text) == pytest.approx(float(amount) * SECONDS_PER[unit])


@pytest.mark.parametrize(
    "text", ["", "s", "-5", "5x", "1e3", "inf", "nan", "1.2.3m", "5 5s", "0x10", "5ms", "٣s"]
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


async def test_watch_timeout_takes_units(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. --timeout 1s on a reply that takes a minute: exit 3 within seconds 2. --timeout 30x:
    exit 2 with one line naming the value."""
    short_id = sim.create_chat("slow", reply_s=60.0)
    env = {**subprocess_env, "QAWATCH_API__TOKEN": sim.config.token, "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.1"}
    code, _, err = await qawatch_async(
        "watch", "--base-url", sim.base_url, "--timeout", "1s", short_id, env=env, cwd=tmp_path
    )
    assert code == 3, err
    assert "no finished reply within 1s" in err
    code, _, err = await qawatch_async("watch", "--timeout", "30x", short_id, env=env, cwd=tmp_path)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "'30x'" in line


def test_tables_show_times_in_utc_with_how_long_ago() -> None:
    """`list` and `dead-letters list` show a time as RFC 3339 in UTC (Z) and relative to now."""
    now = 1_795_773_600.0  # 2026-11-27T10:00:00Z
    assert shown_time(now - 42, now) == "2026-11-27T09:59:18Z (42s ago)"
    assert shown_time(now + 90, now) == "2026-11-27T10:01:30Z (in 2m)"
    assert shown_time(now - 7200, now) == "2026-11-27T08:00:00Z (2h ago)"
    assert shown_time(None, now) == "-"
