"""Hostile input to the command line as users run it (real subprocesses): ids that only look
whole, a damaged state file, a configuration nested too deeply. Each is exit 2 with one line
naming what is wrong, never exit 1 "internal error" (which systemd would restart forever)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import yaml
from support import closed_port, one_line_error, qawatch_async

from daemon.store import SqliteStore

#: ids QA.tech's pattern ``^chat(-.+_.+|_.+)$`` matches when ``$`` is taken for the end
NOT_WHOLE = {"newline": "chat_x\n", "cr": "chat_x\r", "tab": "chat_x\ty", "del": "chat_x\x7f"}
LONGEST = "chat_" + "a" * 195  # SHORT_ID_MAX_LEN, 200 characters


@pytest.fixture
def bare_env(subprocess_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No daemon, no API: every call here must stop at its input."""
    return {
        **subprocess_env,
        "QAWATCH_API__TOKEN": "tok-hardening-1",
        "QAWATCH_API__BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "QAWATCH_CONTROL__LISTEN": f"127.0.0.1:{closed_port()}",
        "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
        "QAWATCH_LOG__FORMAT": "json",
    }


# ---------------------------------------------------------------------------- 8. ids


@pytest.mark.parametrize(
    "args",
    [
        *(("watch", "chat_fine", bad_id, "--timeout", "5") for bad_id in NOT_WHOLE.values()),
        ("ask", "--chat", NOT_WHOLE["newline"], "hello", "--timeout", "5"),
        ("add", NOT_WHOLE["newline"]),
        ("remove", NOT_WHOLE["newline"]),
    ],
    ids=[*(f"watch-{name}" for name in NOT_WHOLE), "ask-newline", "add-newline", "remove-newline"],
)
async def test_ids_with_control_characters_exit_2_everywhere(
    bare_env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    """1. watch, ask --chat, add and remove with an id that ends in or holds a control
    character (no daemon runs, the API cannot be reached) 2. each exits 2 at once, one line
    naming the id (escaped), nothing on stdout."""
    bad_id = next(arg for arg in args if arg in NOT_WHOLE.values())
    code, out, err = await qawatch_async(*args, env=bare_env, cwd=tmp_path)
    assert code == 2, err
    assert repr(bad_id) in one_line_error(err)
    assert out == ""


async def test_a_100000_character_id_exits_2_with_a_short_line(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    """1. watch with an id of 100,005 characters 2. exit 2 3. the one line says it is longer than
    200 characters and quotes only its start."""
    code, out, err = await qawatch_async("watch", "chat_" + "a" * 100_000, env=bare_env, cwd=tmp_path)
    assert code == 2, err
    line = one_line_error(err)
    assert "longer than 200 characters" in line
    assert len(line) < 300
    assert out == ""


@pytest.mark.parametrize(
    ("bad_id", "shown"),
    [("chat_x\n", r"'chat_x\n'"), ("chat_x\x00", r"'chat_x\x00'"), ("chat_" + "b" * 196, "longer than 200")],
    ids=["newline", "nul", "201-chars"],
)
async def test_config_ids_are_matched_whole(
    bare_env: dict[str, str], tmp_path: Path, bad_id: str, shown: str
) -> None:
    """1. watch.ids in the YAML file holds an id with a newline, a NUL, or of 201 characters
    2. check-config and run exit 2, one line naming watch.ids.0 and the id."""
    config = tmp_path / "qawatch.yaml"
    config.write_text(yaml.safe_dump({"watch": {"ids": [bad_id]}}), encoding="utf-8")
    for command in ("check-config", "run"):
        code, _, err = await qawatch_async(command, "--config", str(config), env=bare_env, cwd=tmp_path)
        assert code == 2, (command, err)
        line = one_line_error(err)
        assert line.startswith("qawatch: config error: watch.ids.0: "), line
        assert shown in line
        assert len(line) < 300


async def test_watch_file_ids_are_matched_whole(bare_env: dict[str, str], tmp_path: Path) -> None:
    """1. a watch file whose second line holds a NUL 2. check-config exits 2 naming the file,
    the line and the id."""
    watch_file = tmp_path / "ids.txt"
    watch_file.write_bytes(b"chat_fine\nchat_x\x00y\n")
    env = {**bare_env, "QAWATCH_WATCH__FILE": str(watch_file)}
    code, _, err = await qawatch_async("check-config", env=env, cwd=tmp_path)
    assert code == 2, err
    line = one_line_error(err)
    assert "watch.file" in line
    assert "line 2" in line
    assert r"'chat_x\x00y'" in line


async def test_an_id_of_200_characters_is_accepted(bare_env: dict[str, str], tmp_path: Path) -> None:
    """1. watch.ids holds an id of exactly 200 characters (the bound) 2. check-config exits 0."""
    config = tmp_path / "qawatch.yaml"
    config.write_text(yaml.safe_dump({"watch": {"ids": [LONGEST]}}), encoding="utf-8")
    code, out, err = await qawatch_async("check-config", "--config", str(config), env=bare_env, cwd=tmp_path)
    assert code == 0, err
    assert LONGEST in out


# ---------------------------------------------------------------------------- 9. state and YAML


def damaged_state(path: Path) -> None:
    """A real state file (2,000 watches, so it spans pages) whose pages after the first two are
    overwritten: SQLite opens it, and only fails when a query reaches a damaged page."""
    store = SqliteStore(path)
    store.open()
    store.sync_config_watches([f"chat_{i}" for i in range(2000)], "latest", 1.0)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[2 * 4096 :] = b"\x5a" * (len(data) - 2 * 4096)
    path.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        with_suffix = path.with_name(path.name + suffix)
        if with_suffix.exists():
            os.unlink(with_suffix)


@pytest.mark.parametrize(
    "args", [("run",), ("dead-letters", "list"), ("dead-letters", "replay", "--all")], ids=" ".join
)
async def test_a_damaged_state_file_exits_2_naming_state_path(
    bare_env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    """1. state.path is a SQLite file with damaged pages 2. run and dead-letters exit 2 (not 1
    "internal error", which systemd would restart every few seconds) 3. one line naming
    state.path and the file."""
    state = tmp_path / "state.db"
    damaged_state(state)
    code, out, err = await qawatch_async(*args, env=bare_env, cwd=tmp_path)
    assert code == 2, err
    line = one_line_error(err)
    assert line.startswith("qawatch: config error: state.path: "), line
    assert str(state) in line
    assert "internal error" not in line
    assert out == ""


@pytest.mark.parametrize("detector", ['{"v"~2}', '{"v":2,"seen":"not base64!"}', "[1]"])
async def test_a_damaged_detector_state_exits_2_naming_state_path(
    bare_env: dict[str, str], tmp_path: Path, detector: str
) -> None:
    """1. a state file that SQLite finds sound, but one watch's detector state has a flipped
    byte (or is not what qawatch writes) 2. run exits 2 naming state.path, not 1. (States are
    read just after start-up, so the daemon's own start lines may come first: the error is the
    last line, and there is no traceback.)"""
    state = tmp_path / "state.db"
    store = SqliteStore(state)
    store.open()
    store.sync_config_watches(["chat_a"], "latest", 0.0)
    store.close()
    with sqlite3.connect(state) as db:
        db.execute("UPDATE watches SET detector = ?", (detector,))
    code, _, err = await qawatch_async("run", env={**bare_env, "QAWATCH_WATCH__IDS": "chat_a"}, cwd=tmp_path)
    assert code == 2, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"qawatch: config error: state.path: {state} is damaged"), line


async def test_a_file_that_is_not_a_database_exits_2(bare_env: dict[str, str], tmp_path: Path) -> None:
    """1. state.path holds bytes that are not SQLite 2. run exits 2 naming state.path."""
    (tmp_path / "state.db").write_bytes(b"not a database\n" * 1000)
    code, _, err = await qawatch_async("run", env=bare_env, cwd=tmp_path)
    assert code == 2, err
    assert one_line_error(err).startswith("qawatch: config error: state.path: ")


@pytest.mark.parametrize(
    "text",
    [
        "watch:\n  ids: " + "[" * 50_000 + "]" * 50_000 + "\n",
        "api:\n" + "".join("  " * depth + "k:\n" for depth in range(1, 3000)),
    ],
    ids=["flow", "block"],
)
async def test_a_deeply_nested_yaml_config_exits_2_naming_the_file(
    bare_env: dict[str, str], tmp_path: Path, text: str
) -> None:
    """1. a YAML configuration nested thousands deep (flow or block style) 2. check-config
    and run exit 2 (not 1 "internal error") 3. one line naming the file."""
    config = tmp_path / "deep.yaml"
    config.write_text(text, encoding="utf-8")
    for command in ("check-config", "run"):
        code, _, err = await qawatch_async(command, "--config", str(config), env=bare_env, cwd=tmp_path)
        assert code == 2, (command, err)
        line = one_line_error(err)
        assert "deep.yaml" in line
        assert "nested too deeply" in line


async def test_a_deeply_nested_json_value_in_the_environment_exits_2(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    """1. QAWATCH_SINKS holds a JSON list nested 100,000 deep 2. check-config exits 2 with one
    line saying so."""
    env = {**bare_env, "QAWATCH_SINKS": "[" * 100_000}
    code, _, err = await qawatch_async("check-config", env=env, cwd=tmp_path)
    assert code == 2, err
    assert "nested too deeply" in one_line_error(err)
