"""Import layering: the pure parts (the detector, the models, the store) load without the HTTP
client or aiohttp. Each check runs in a fresh interpreter, where nothing was imported before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what only the HTTP side (the API client, the webhook sink) may load
HTTP_MODULES = ("aiohttp", "yarl", "daemon.qatech")


def loaded_after_import(module: str, candidates: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Which of ``candidates`` are in ``sys.modules`` after a fresh interpreter imports ``module``."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([name for name in {list(candidates)!r} if name in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("module", ["daemon.detect", "daemon.models", "daemon.store"])
def test_pure_modules_do_not_load_the_http_client(module: str, subprocess_env: dict[str, str]) -> None:
    assert loaded_after_import(module, HTTP_MODULES, subprocess_env) == []


def test_the_check_sees_what_is_loaded(subprocess_env: dict[str, str]) -> None:
    """The check itself works: the client module does load aiohttp."""
    assert loaded_after_import("daemon.qatech", HTTP_MODULES, subprocess_env) == list(HTTP_MODULES)
