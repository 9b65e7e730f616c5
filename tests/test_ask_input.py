"""`ask -`, `ask --file`, `--output text` and `--interval`, as real child processes against the
simulator."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

from support import CALL_TIMEOUT_S, QAWATCH, qawatch_async

from daemon.simulator import Simulator


def env_for(sim: Simulator, subprocess_env: dict[str, str]) -> dict[str, str]:
    return {
        **subprocess_env,
        "QAWATCH_API__TOKEN": sim.config.token,
        "QAWATCH_API__BASE_URL": sim.base_url,
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
    }


async def run_with_stdin(env: dict[str, str], cwd: Path, data: bytes, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *QAWATCH, *args, env=env, cwd=cwd,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(data), CALL_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def posted(sim: Simulator) -> list[str]:
    return [r.path for r in sim.requests if r.method == "POST"]


async def test_ask_dash_reads_the_message_from_stdin_and_text_output_is_the_reply(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. `ask - --output text` with the question on stdin (two lines, non-ASCII) 2. that text
    is what was sent, not "-" 3. stdout is the reply's text alone, for $(qawatch ask ...)."""
    code, out, err = await run_with_stdin(
        env_for(sim, subprocess_env), tmp_path, "Does the café page load?\nAnd the menu?\n".encode(),
        "ask", "-", "--output", "text", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("Answer to 'Does the café page load? And the menu?'")
    assert out.count("\n") == 1
    assert json.dumps("-") not in out


async def test_ask_file_and_the_bad_combinations(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. --file with the message 2. sent and answered 3. a message and --file, neither, a file
    that is not UTF-8 or too long: exit 2 with one line, nothing posted."""
    env = env_for(sim, subprocess_env)
    (tmp_path / "question.txt").write_text("From a file?\n")
    code, out, err = await qawatch_async("ask", "--file", "question.txt", "--quiet", env=env, cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["data"]["message"]["text"].startswith("Answer to 'From a file?'")
    before = len(posted(sim))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "huge.txt").write_bytes(b"x" * (1024 * 1024 + 1))
    for args in (("hi", "--file", "question.txt"), (), ("--file", "latin1.txt"), ("--file", "huge.txt")):
        code, out, err = await qawatch_async("ask", *args, env=env, cwd=tmp_path)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert out == ""
    assert len(posted(sim)) == before


async def test_interval_sets_the_pace_of_a_wait(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. `watch --interval 0.3s` on a reply that takes 2 s 2. polls about 0.3 s apart (the
    default would be 2 s, the test's environment 0.05 s)."""
    short_id = sim.create_chat("slow", reply_s=2.0)
    code, _, err = await qawatch_async(
        "watch", "--interval", "0.3s", "--quiet", short_id, env=env_for(sim, subprocess_env), cwd=tmp_path
    )
    assert code == 0, err
    times = [r.at for r in sim.requests_for(short_id) if r.method == "GET"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 4 <= len(times) <= 10, times
    assert min(gaps) >= 0.3 * 0.85, gaps


async def test_log_level_debug_shows_each_answer_of_a_wait(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. `watch --log-level debug --log-format json` 2. a JSON log line per answer on stderr
    3. without it, none."""
    short_id = sim.create_chat("q", reply_s=1.5)
    env = env_for(sim, subprocess_env)
    code, _, err = await qawatch_async(
        "watch", "--log-level", "debug", "--log-format", "json", "--quiet", short_id, env=env, cwd=tmp_path
    )
    assert code == 0, err
    answers = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(answers) >= 2
    assert {a["event"] for a in answers} == {"answer"}
    assert answers[-1]["conversation"] == short_id
    code, _, err = await qawatch_async("watch", "--quiet", short_id, env=env, cwd=tmp_path)
    assert code == 0, err
    assert err == ""


async def test_a_reader_that_stops_reading_is_one_line_not_an_internal_error(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. `watch` whose stdout pipe has no reader any more (`| head -1` after the first line)
    2. exit 2 with one line saying so, not 1 "internal error" with a BrokenPipeError."""
    short_id = sim.create_chat("q", reply_s=0.5)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the reply comes
    try:
        process = await asyncio.create_subprocess_exec(
            *QAWATCH, "watch", "--quiet", short_id, env=env_for(sim, subprocess_env), cwd=tmp_path,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(process.communicate(), CALL_TIMEOUT_S)
    assert process.returncode == 2, err
    assert err.decode().strip() == "qawatch: standard output was closed before everything was written"
