"""The GitHub Action (``action.yml``): its metadata against GitHub's schema and the rules that
keep it safe, and its main step (``.github/actions/qawatch/run.py``) as a real child process
in a simulated runner (GITHUB_OUTPUT, GITHUB_STEP_SUMMARY, RUNNER_TEMP, INPUT_* variables),
running the real ``qawatch`` against a simulator thread."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import CALL_TIMEOUT_S

from daemon.simulator import SimulatorThread

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
SCRIPTS = ROOT / ".github" / "actions" / "qawatch"
RUN_PY = SCRIPTS / "run.py"
SETUP_SH = SCRIPTS / "setup.sh"
#: the qawatch the action's main step runs (the editable install of `make venv`)
ACTION_QAWATCH = Path(sys.executable).with_name("qawatch")
STATUSES = {"completed", "failed", "cancelled", "timeout", "error"}


def load_action() -> dict[str, Any]:
    action: dict[str, Any] = yaml.safe_load(ACTION.read_text(encoding="utf-8"))
    return action


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the schema of GitHub's action metadata that it ships."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-actions", str(path)],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )


# ---------------------------------------------------------------------------------------
# action.yml


def test_action_yml_matches_githubs_schema() -> None:
    """1. check-jsonschema --builtin-schema vendor.github-actions action.yml 2. exit 0."""
    result = validate(ACTION)
    assert result.returncode == 0, result.stdout + result.stderr


def _steps(action: dict[str, Any]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = action["runs"]["steps"]
    return steps


def _run_step(action: dict[str, Any]) -> dict[str, Any]:
    return next(step for step in _steps(action) if "run" in step)


BROKEN: dict[str, Any] = {
    "run-step-without-shell": lambda a: _run_step(a).pop("shell"),
    "output-without-value": lambda a: a["outputs"]["status"].pop("value"),
    "required-not-a-boolean": lambda a: a["inputs"]["token"].update(required="yes"),
    "unknown-runs-using": lambda a: a["runs"].update(using="compose"),
    "step-with-run-and-uses": lambda a: _run_step(a).update(uses="actions/setup-python@v5"),
    "no-description": lambda a: a.pop("description"),
    "unknown-step-key": lambda a: _run_step(a).update(script="true"),
}


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
def test_the_schema_check_rejects_a_broken_action(tmp_path: Path, breakage: Any) -> None:
    """1. a copy of action.yml (dumped from its YAML) passes 2. the same copy with one mistake
    GitHub would refuse fails the check: the check in the test above can fail."""
    copy = tmp_path / "action.yml"
    action = load_action()
    copy.write_text(yaml.safe_dump(action, sort_keys=False), encoding="utf-8")
    assert validate(copy).returncode == 0
    breakage(action)
    copy.write_text(yaml.safe_dump(action, sort_keys=False), encoding="utf-8")
    result = validate(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "validation errors" in result.stdout + result.stderr


def test_action_takes_inputs_only_through_the_environment() -> None:
    """Script-injection safety, and the wiring: 1. no ${{ }} expression in any script, every
    script step is bash 2. the only action used is actions/setup-python pinned to a major
    3. the token goes to QAWATCH_API__TOKEN of the main step and nowhere else 4. every input
    is used 5. each output is the main step's output of the same name 6. the scripts exist."""
    action = load_action()
    assert action["runs"]["using"] == "composite"
    scripts: list[str] = []
    for step in _steps(action):
        if "run" in step:
            assert "${{" not in step["run"], step["run"]
            assert step["shell"] == "bash"
            scripts += re.findall(r'"\$GITHUB_ACTION_PATH/([^"]+)"', step["run"])
        else:
            assert re.fullmatch(r"actions/setup-python@v\d+", step["uses"]), step["uses"]
    token_uses = [
        (step.get("id"), name)
        for step in _steps(action)
        for name, value in (step.get("env") or {}).items()
        if "inputs.token" in str(value)
    ]
    assert token_uses == [("run", "QAWATCH_API__TOKEN")]
    assert json.dumps(_steps(action)).count("inputs.token") == 1
    used = set(re.findall(r"inputs\.([A-Za-z0-9_-]+)", json.dumps(_steps(action))))
    assert used == set(action["inputs"])
    assert action["inputs"]["token"]["required"] is True
    assert action["inputs"]["timeout"]["default"] == "30m"
    for name, output in action["outputs"].items():
        assert output["value"] == f"${{{{ steps.run.outputs.{name} }}}}"
    assert {"status", "conversation-url", "reply-file"} <= set(action["outputs"])
    assert sorted(scripts) == [".github/actions/qawatch/run.py", *[".github/actions/qawatch/setup.sh"] * 2]
    for script in scripts:
        assert (ROOT / script).is_file(), script


# ---------------------------------------------------------------------------------------
# the main step, run as the runner runs it


@dataclass
class StepRun:
    code: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str
    runner_temp: Path
    token: str

    def reply(self) -> str:
        return Path(self.outputs["reply-file"]).read_text(encoding="utf-8")

    def events(self) -> list[dict[str, Any]]:
        text = Path(self.outputs["events-file"]).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()]


def read_outputs(path: Path) -> dict[str, str]:
    """$GITHUB_OUTPUT as the runner reads it (``name=value`` and ``name<<DELIMITER`` blocks),
    each name at most once."""
    outputs: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line:
            continue
        if "<<" in line:
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, index)
            value = "\n".join(lines[index:end])
            index = end + 1
        else:
            name, value = line.split("=", 1)
        assert name not in outputs, f"output {name} set twice"
        outputs[name] = value
    return outputs


@pytest.fixture
def step_env(subprocess_env: dict[str, str], sim_thread: SimulatorThread) -> dict[str, str]:
    """What the action's main step gets from action.yml, minus the inputs (fast polling)."""
    assert ACTION_QAWATCH.is_file(), f"{ACTION_QAWATCH} is missing: pip install -e '.[dev]'"
    return {
        **subprocess_env,
        "GITHUB_ACTIONS": "true",
        "QAWATCH_API__TOKEN": sim_thread.sim.config.token,
        "ACTION_QAWATCH": str(ACTION_QAWATCH),
        "INPUT_BASE_URL": sim_thread.base_url,
        "INPUT_TIMEOUT": "30m",
        "INPUT_SUMMARY": "true",
        "QAWATCH_API__TIMEOUT_S": "2",
        "QAWATCH_POLL__ACTIVE_INTERVAL_S": "0.05",
        "QAWATCH_POLL__IDLE_INTERVAL_S": "0.2",
        "QAWATCH_POLL__JITTER": "0",
        "QAWATCH_LOG__FORMAT": "json",
    }


def runner_files(tmp_path: Path) -> dict[str, str]:
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    (tmp_path / "github_output").touch()
    (tmp_path / "step_summary").touch()
    return {
        "RUNNER_TEMP": str(temp),
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "step_summary"),
    }


@dataclass
class Step:
    """The main step's process, started by :func:`start_step`."""

    process: subprocess.Popen[str]
    tmp_path: Path
    token: str

    def finished(self, timeout: float = CALL_TIMEOUT_S) -> StepRun:
        """The step's result, once its process ends (killed after ``timeout``)."""
        try:
            out, err = self.process.communicate(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.communicate()
        return StepRun(
            code=self.process.returncode,
            stdout=out,
            stderr=err,
            outputs=read_outputs(self.tmp_path / "github_output"),
            summary=(self.tmp_path / "step_summary").read_text(encoding="utf-8"),
            runner_temp=self.tmp_path / "runner-temp",
            token=self.token,
        )


def start_step(env: dict[str, str], tmp_path: Path, **inputs: str) -> Step:
    """``python run.py`` as action.yml runs it: inputs as INPUT_<NAME> (``base_url=`` and so on)."""
    env = {**env, **runner_files(tmp_path)}
    env.update({f"INPUT_{name.upper()}": value for name, value in inputs.items()})
    process = subprocess.Popen(
        [sys.executable, str(RUN_PY)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Step(process, tmp_path, env.get("QAWATCH_API__TOKEN", ""))


def run_step(env: dict[str, str], tmp_path: Path, **inputs: str) -> StepRun:
    return start_step(env, tmp_path, **inputs).finished()


def assert_outputs_complete(run: StepRun) -> None:
    """Every output action.yml declares was set, status is one of the five, and exit-code is the
    step's; no output, log or summary shows the token."""
    assert set(run.outputs) == set(load_action()["outputs"])
    assert run.outputs["status"] in STATUSES
    assert run.outputs["exit-code"] == str(run.code)
    if run.token:
        for text in (run.stdout, run.stderr, run.summary, *run.outputs.values()):
            assert run.token not in text
    events_file = Path(run.outputs["events-file"])
    assert events_file.is_file()
    assert events_file.is_relative_to(run.runner_temp)


def assert_commands_stopped_around_events(run: StepRun) -> None:
    """The event lines (which carry the reply's text) are printed while workflow commands are off."""
    match = re.search(r"^::stop-commands::(\w+)$", run.stdout, re.MULTILINE)
    assert match, run.stdout
    start, resume = match.end(), run.stdout.index(f"\n::{match.group(1)}::\n")
    lines = Path(run.outputs["events-file"]).read_text(encoding="utf-8").splitlines()
    assert lines
    for line in lines:
        assert start < run.stdout.index(line) < resume


def test_step_ask_completed_sets_the_outputs(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. message "Is the pricing page up?" (a new chat) 2. exit 0, status completed 3. the
    event line is in events-file and in the log 4. conversation-url and conversation-id are
    the event's 5. reply-file under RUNNER_TEMP holds the reply's text 6. the job summary
    names the outcome, links the conversation and shows the reply."""
    run = run_step(step_env, tmp_path, message="Is the pricing page up?")
    assert run.code == 0, run.stderr
    assert_outputs_complete(run)
    (event,) = run.events()
    assert event["type"] == "chat.reply.completed"
    conversation = event["data"]["conversation"]
    assert run.outputs["status"] == "completed"
    assert run.outputs["conversation-url"] == conversation["url"]
    assert run.outputs["conversation-url"].startswith("https://")
    assert run.outputs["conversation-id"] == conversation["shortId"]
    assert Path(run.outputs["reply-file"]).is_relative_to(run.runner_temp)
    assert run.reply() == event["data"]["message"]["text"]
    assert "Is the pricing page up?" in run.reply()
    assert_commands_stopped_around_events(run)
    assert "### qawatch: completed" in run.summary
    assert conversation["url"] in run.summary
    assert event["data"]["message"]["text"] in run.summary
    assert "::error" not in run.stdout
    creates = [r for r in sim_thread.sim.requests if r.method == "POST" and r.path == "/v1/chat"]
    assert len(creates) == 1


def test_step_ask_failed_fails_the_step(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. every reply of the simulator ends FAILED 2. the step exits 1 (the job fails), status
    failed 3. reply-file holds the failure's text, conversation-url is set 4. an error
    annotation names the conversation, after workflow commands are back on."""
    sim_thread.sim.config.fail_rate = 1.0
    run = run_step(step_env, tmp_path, message="Run the checkout smoke test")
    assert run.code == 1, run.stderr
    assert_outputs_complete(run)
    (event,) = run.events()
    assert event["type"] == "chat.reply.failed"
    assert run.outputs["status"] == "failed"
    assert run.outputs["conversation-url"] == event["data"]["conversation"]["url"]
    assert run.reply() == event["data"]["message"]["text"]
    assert_commands_stopped_around_events(run)
    annotation = re.search(r"^::error title=qawatch::(.*)$", run.stdout, re.MULTILINE)
    assert annotation, run.stdout
    assert "FAILED" in annotation.group(1)
    assert event["data"]["conversation"]["url"] in annotation.group(1)
    assert run.stdout.index("::error") > run.stdout.rindex("::stop-commands::")
    assert "### qawatch: failed" in run.summary


@pytest.mark.parametrize(("outcome", "status"), [("FAILED", "failed"), ("CANCELLED", "cancelled")])
def test_step_watch_a_finished_reply(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, outcome: str, status: str
) -> None:
    """1. a conversation whose reply already ended FAILED/CANCELLED 2. conversations: its id
    3. exit 1, status failed/cancelled, reply-file holds its text (the simulator's)."""
    short_id = sim_thread.sim.create_chat("question", outcome=outcome, reply_s=0.0)
    run = run_step(step_env, tmp_path, conversations=f"  {short_id}\n")
    assert run.code == 1, run.stderr
    assert_outputs_complete(run)
    assert run.outputs["status"] == status
    assert run.outputs["conversation-id"] == short_id
    (event,) = run.events()
    assert event["data"]["message"]["status"] == outcome
    assert run.reply() == event["data"]["message"]["text"]
    assert run.reply()


def test_step_watch_several_and_follow_up(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. two conversations, given as "a, b" 2. exit 0, both ids and URLs (one per line), both
    replies in reply-file 3. then a follow-up (message + chat) in the first: its id again."""
    sim = sim_thread.sim
    for name in ("watch", "ask"):
        (tmp_path / name).mkdir()
    first = sim.create_chat("one", reply="first answer", reply_s=0.0)
    second = sim.create_chat("two", reply="second answer", reply_s=0.2)
    run = run_step(step_env, tmp_path / "watch", conversations=f"{first}, {second}")
    assert run.code == 0, run.stderr
    assert_outputs_complete(run)
    assert sorted(run.outputs["conversation-id"].split("\n")) == sorted([first, second])
    assert len(run.outputs["conversation-url"].split("\n")) == 2
    assert f"==> {first}: COMPLETED <==\nfirst answer\n" in run.reply()
    assert f"==> {second}: COMPLETED <==\nsecond answer\n" in run.reply()

    follow = run_step(step_env, tmp_path / "ask", message="and now?", chat=first)
    assert follow.code == 0, follow.stderr
    assert follow.outputs["conversation-id"] == first
    assert "and now?" in follow.reply()


def test_step_timeout_exits_3(step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread) -> None:
    """1. a reply that takes a minute, timeout "1s" (a unit: the step converts it) 2. exit 3
    within seconds, status timeout, no reply-file, an error annotation."""
    short_id = sim_thread.sim.create_chat("slow", reply_s=60.0)
    started = time.monotonic()
    run = run_step(step_env, tmp_path, conversations=short_id, timeout="1s")
    assert run.code == 3, run.stderr
    assert time.monotonic() - started < 10
    assert_outputs_complete(run)
    assert run.outputs["status"] == "timeout"
    assert run.outputs["reply-file"] == ""
    assert run.outputs["conversation-id"] == short_id  # a later step can still follow it up
    assert "::error title=qawatch::no reply within" in run.stdout
    assert "### qawatch: timeout" in run.summary


def test_step_ask_timeout_still_names_the_chat_it_started(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. ask, and the reply takes a minute; timeout 1s 2. exit 3, and the outputs name the new
    chat and its URL (from qawatch's "started" line), so that a later step can follow it up."""
    sim_thread.sim.config.reply_s = 60.0
    run = run_step(step_env, tmp_path, message="slow one", timeout="1s")
    assert run.code == 3, run.stderr
    assert run.outputs["status"] == "timeout"
    assert re.fullmatch(r"chat_[0-9a-f]{8}", run.outputs["conversation-id"]), run.outputs
    assert run.outputs["conversation-url"].endswith(run.outputs["conversation-id"])
    assert "qawatch: started chat_" in run.stderr  # qawatch's stderr still reaches the log


def test_step_refused_token_is_an_error(step_env: dict[str, str], tmp_path: Path) -> None:
    """1. a token the API refuses 2. exit 4 (qawatch's), status error, an annotation saying so."""
    run = run_step({**step_env, "QAWATCH_API__TOKEN": "qwt-WRONG-77"}, tmp_path, message="hello")
    assert run.code == 4
    assert_outputs_complete(run)
    assert run.outputs["status"] == "error"
    assert "qwt-WRONG-77" not in run.stdout + run.stderr
    assert re.search(r"^::error title=qawatch::the API refused", run.stdout, re.MULTILINE)


BAD_INPUTS = {
    "both-message-and-conversations": {"message": "hi", "conversations": "chat_a"},
    "neither": {"message": "  "},
    "chat-with-conversations": {"conversations": "chat_a", "chat": "chat_b"},
    "timeout-without-a-number": {"message": "hi", "timeout": "soon"},
    "zero-timeout": {"message": "hi", "timeout": "0m"},
    "empty-token": {"message": "hi", "QAWATCH_API__TOKEN": ""},
}


@pytest.mark.parametrize("inputs", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_step_bad_inputs_exit_2_without_a_request(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread, inputs: dict[str, str]
) -> None:
    """1. inputs that make no sense 2. exit 2, status error, one error annotation 3. the API
    saw no request."""
    env = {**step_env, **{k: v for k, v in inputs.items() if k.isupper()}}
    run = run_step(env, tmp_path, **{k: v for k, v in inputs.items() if not k.isupper()})
    assert run.code == 2, run.stdout + run.stderr
    assert_outputs_complete(run)
    assert run.outputs["status"] == "error"
    assert len(re.findall(r"^::error title=qawatch::", run.stdout, re.MULTILINE)) == 1
    assert sim_thread.sim.requests == []


def test_step_passes_sigterm_on(
    step_env: dict[str, str], tmp_path: Path, sim_thread: SimulatorThread
) -> None:
    """1. a long wait (timeout 30m) 2. SIGTERM to the step's process only (as when the job is
    cancelled) 3. qawatch gets it and stops: exit 3 within seconds, status timeout."""
    short_id = sim_thread.sim.create_chat("slow", reply_s=600.0)
    step = start_step(step_env, tmp_path, conversations=short_id)
    deadline = time.monotonic() + 10
    while not any(r.method == "GET" for r in sim_thread.sim.requests_for(short_id)):
        assert time.monotonic() < deadline, "qawatch never polled"
        assert step.process.poll() is None, step.process.communicate()
        time.sleep(0.02)
    step.process.send_signal(signal.SIGTERM)
    run = step.finished(timeout=10)
    assert run.code == 3, run.stderr
    assert run.outputs["status"] == "timeout"


# ---------------------------------------------------------------------------------------
# setup.sh detect: which Python


def detect(tmp_path: Path, path: str, python_input: str = "") -> dict[str, str]:
    (tmp_path / "github_output").write_text("", encoding="utf-8")
    result = subprocess.run(
        ["bash", str(SETUP_SH), "detect"],
        env={"PATH": path, "GITHUB_OUTPUT": str(tmp_path / "github_output"), "INPUT_PYTHON": python_input},
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return read_outputs(tmp_path / "github_output")


def test_setup_detect_picks_python(tmp_path: Path) -> None:
    """1. python3 on PATH is 3.11+ with venv: use it 2. python3 and python fail (too old):
    setup-python 3.12 3. input python=3.13: setup-python 3.13 whatever is on PATH."""
    good, old = tmp_path / "good", tmp_path / "old"
    good.mkdir()
    old.mkdir()
    (good / "python3").symlink_to(sys.executable)
    for name in ("python3", "python"):
        (old / name).write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
        (old / name).chmod(0o755)
    system = "/usr/bin:/bin"
    assert detect(tmp_path, f"{good}:{system}") == {"python": "python3", "setup-python": ""}
    assert detect(tmp_path, f"{old}:{system}") == {"python": "", "setup-python": "3.12"}
    assert detect(tmp_path, f"{good}:{system}", "3.13") == {"python": "", "setup-python": "3.13"}
