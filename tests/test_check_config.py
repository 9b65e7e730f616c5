"""`check-config` as a new user runs it: effective sink names, an empty sink list, and
`--check-api` against the real simulator (a good token, a wrong one, nothing listening)."""

from __future__ import annotations

from pathlib import Path

import yaml
from aiohttp import web
from support import closed_port, qawatch_async

from daemon.simulator import Simulator


async def check(tmp_path: Path, env: dict[str, str], text: str, *args: str) -> tuple[int, str, str]:
    config = tmp_path / "qawatch.yaml"
    config.write_text(text)
    return await qawatch_async("check-config", "--config", str(config), *args, env=env, cwd=tmp_path)


async def test_sink_names_are_shown_and_an_empty_sink_list_is_named(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. a file sink without a name and a named webhook 2. check-config shows the names their
    queues go by 3. `sinks: []` is valid, with a warning that nothing is delivered."""
    env = {**subprocess_env, "QAWATCH_API__TOKEN": "tok-check-1234"}
    text = (
        f"sinks:\n  - type: file\n    path: {tmp_path}/out.ndjson\n"
        "  - type: webhook\n    name: hook\n    url: http://127.0.0.1:9/h\n"
    )
    code, out, err = await check(tmp_path, env, text)
    assert code == 0, err
    assert [sink["name"] for sink in yaml.safe_load(out)["sinks"]] == ["file", "hook"]
    assert err == ""
    code, out, err = await check(tmp_path, env, "sinks: []\n")
    assert code == 0, err
    assert err.strip() == "qawatch: warning: sinks is empty: replies are recorded but delivered nowhere"


async def test_check_api_proves_the_url_and_the_token(
    sim: Simulator, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. --check-api with the right token: exit 0, one line saying so, one GET sent 2. a wrong
    token: exit 4 naming the refusal, the token nowhere 3. nothing listening: exit 4 naming the
    URL, at once rather than after the watch timeout."""
    text = f"api:\n  base_url: {sim.base_url}\n"
    good = {**subprocess_env, "QAWATCH_API__TOKEN": sim.config.token}
    code, _, err = await check(tmp_path, good, text, "--check-api")
    assert code == 0, err
    assert err.strip() == f"qawatch: api: {sim.base_url} answers and accepts the token"
    assert [(r.method, r.status) for r in sim.requests] == [("GET", 401), ("GET", 404)]

    wrong = {**subprocess_env, "QAWATCH_API__TOKEN": "tok-WRONG-98765"}
    code, out, err = await check(tmp_path, wrong, text, "--check-api")
    assert code == 4
    (line,) = err.strip().splitlines()
    assert "refused the token (401" in line
    assert "tok-WRONG-98765" not in out + err

    closed = f"api:\n  base_url: http://127.0.0.1:{closed_port()}\n"
    code, _, err = await check(tmp_path, good, closed, "--check-api")
    assert code == 4
    (line,) = err.strip().splitlines()
    assert "cannot reach http://127.0.0.1:" in line


async def test_check_api_refuses_a_server_that_is_not_the_api(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. api.base_url is a plain web server that answers 404 to everything 2. --check-api
    exits 4: a 404 proves nothing when the server never asked for a token."""

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="Not Found")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        env = {**subprocess_env, "QAWATCH_API__TOKEN": "tok-any-123456"}
        code, _, err = await check(
            tmp_path, env, f"api:\n  base_url: http://127.0.0.1:{port}\n", "--check-api"
        )
    finally:
        await runner.cleanup()
    assert code == 4, err
    (line,) = err.strip().splitlines()
    assert "does not look like the QA.tech API" in line
    assert "chat_qawatch-check" not in line
