"""`qawatch run` when the control API cannot listen: real sockets, a real child process.

A port still held (often by the previous instance, still shutting down) is not a configuration
error: it exits 1, which systemd's ``Restart=on-failure`` retries, and not 2, which the unit's
``RestartPreventExitStatus=2`` would never restart.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CALL_TIMEOUT_S, QAWATCH, closed_port, one_line_error


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is bound to and listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def daemon_env(listen: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` plus what `qawatch run` needs, with the control API on ``listen``."""
    return {
        **env,
        "QAWATCH_API__TOKEN": "sim-token",
        "QAWATCH_API__BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "QAWATCH_STATE__PATH": str(tmp_path / "state.db"),
        "QAWATCH_CONTROL__LISTEN": listen,
        "QAWATCH_CONTROL__TOKEN": "control-token",  # an address off loopback needs one
        "QAWATCH_SINKS": '[{"type": "stdout"}]',
    }


def run_daemon(listen: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*QAWATCH, "run"],
        env={**daemon_env(listen, env, tmp_path), "QAWATCH_LOG__LEVEL": "warning"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )


def test_a_held_control_port_exits_1_so_that_systemd_restarts(
    held_port: int, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """1. another process listens on 127.0.0.1:P 2. `qawatch run` with control.listen on it
    3. exit 1 (not 2, which RestartPreventExitStatus=2 would never restart) 4. one line naming
    the address and the reason, no traceback."""
    result = run_daemon(f"127.0.0.1:{held_port}", subprocess_env, tmp_path)
    line = one_line_error(result.stderr)
    assert result.returncode == 1, (result.returncode, line)
    assert f"control.listen: cannot listen on 127.0.0.1:{held_port}" in line
    assert "in use" in line.lower()


def test_the_daemon_starts_once_the_port_is_free(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. a port is held 2. `qawatch run` exits 1 3. the holder lets go 4. the next start (what
    systemd's restart does) listens on it and runs until SIGTERM, then exits 0."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        assert run_daemon(f"127.0.0.1:{port}", subprocess_env, tmp_path).returncode == 1
    finally:
        holder.close()
    env = daemon_env(f"127.0.0.1:{port}", subprocess_env, tmp_path)
    with subprocess.Popen(
        [*QAWATCH, "run"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:  # JSON logs: wait for the control API's line
                if "control API listening" in line:
                    break
            else:
                pytest.fail(f"the daemon exited {process.wait()} without listening")
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            process.terminate()
            assert process.wait(timeout=CALL_TIMEOUT_S) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_an_address_not_on_this_host_exits_2(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """1. control.listen on 192.0.2.1 (TEST-NET-1, on no interface here) 2. exit 2: far more
    often a typo than an interface still coming up, so no restart every 5 s forever; one line,
    no traceback."""
    result = run_daemon("192.0.2.1:8787", subprocess_env, tmp_path)
    line = one_line_error(result.stderr)
    assert result.returncode == 2, (result.returncode, line)
    assert "control.listen: cannot listen on 192.0.2.1:8787" in line
