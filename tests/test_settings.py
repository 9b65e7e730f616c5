"""Settings: precedence, validation messages that name the key, secrets kept out of sight."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.errors import ConfigError
from daemon.scheduler import DEFAULT_WAITING_INTERVAL_S, Pacing, next_interval
from daemon.settings import (
    PollSettings,
    Settings,
    load_settings,
    mask_url,
    redacted,
    resolve_token,
    sink_names,
)

SECRET = "qwt-TOPSECRET-0d9e8f7a"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qawatch.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load(
    tmp_path: Path,
    yaml_text: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    config = write_yaml(tmp_path, yaml_text) if yaml_text is not None else None
    return load_settings(config, overrides, environ=os.environ)


def dig(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# ---------------------------------------------------------------------------------------
# precedence: flags > env > YAML > defaults, per key


@dataclass(frozen=True)
class Layers:
    """One key's value in each source; each differs from the default."""

    key: str
    in_yaml: Any
    in_env: Any
    in_flag: Any


PRECEDENCE = [
    Layers("api.base_url", "http://yaml.test", "http://env.test", "http://flag.test"),
    Layers("log.level", "warning", "error", "debug"),
    Layers("state.path", "yaml.db", "env.db", "flag.db"),
    Layers("poll.active_interval_s", 0.5, 0.7, 0.9),
    Layers("poll.waiting_interval_s", 8.0, 9.0, 10.0),
    Layers("api.message_limit", 5, 6, 7),
]


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    section, key = dotted.split(".")
    return {section: {key: value}}


def _env_name(dotted: str) -> str:
    return "QAWATCH_" + dotted.replace(".", "__").upper()


def _typed(dotted: str, value: Any) -> Any:
    return Path(value) if dotted == "state.path" else value


@pytest.mark.parametrize("case", PRECEDENCE, ids=[c.key for c in PRECEDENCE])
def test_each_source_overrides_the_weaker_ones(env: pytest.MonkeyPatch, tmp_path: Path, case: Layers) -> None:
    """1. default alone 2. YAML beats the default 3. env beats YAML 4. a flag beats env."""
    key = case.key
    default = dig(load(tmp_path), key)
    assert default not in {_typed(key, v) for v in (case.in_yaml, case.in_env, case.in_flag)}

    yaml_text = yaml.safe_dump(_nested(key, case.in_yaml))
    in_yaml = _typed(key, case.in_yaml)
    if isinstance(in_yaml, Path):  # relative to the YAML file's folder
        in_yaml = tmp_path / in_yaml
    assert dig(load(tmp_path, yaml_text), key) == in_yaml

    env.setenv(_env_name(key), str(case.in_env))
    assert dig(load(tmp_path, yaml_text), key) == _typed(key, case.in_env)

    assert dig(load(tmp_path, yaml_text, _nested(key, case.in_flag)), key) == _typed(key, case.in_flag)


def test_precedence_is_per_key_not_per_section(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. YAML sets three api keys 2. env overrides one, a flag another
    3. each key comes from its strongest source; the section is merged, not replaced."""
    yaml_text = "api:\n  base_url: http://yaml.test\n  timeout_s: 3\n  message_limit: 7\n"
    env.setenv("QAWATCH_API__TIMEOUT_S", "4")
    env.setenv("QAWATCH_API__TOKEN", SECRET)
    settings = load(tmp_path, yaml_text, {"api": {"base_url": "http://flag.test"}})
    assert settings.api.base_url == "http://flag.test"
    assert settings.api.timeout_s == 4.0
    assert settings.api.message_limit == 7
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == SECRET
    assert settings.api.max_concurrency == 32  # untouched: the default


def test_env_name_is_case_insensitive_and_nested_with_double_underscore(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1. lower-case QAWATCH_poll__jitter 2. it sets poll.jitter; other poll keys keep defaults."""
    env.setenv("qawatch_poll__jitter", "0.25")
    settings = load(tmp_path)
    assert settings.poll.jitter == 0.25
    assert settings.poll.active_interval_s == 2.0


def test_config_path_comes_from_qawatch_config(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. no --config 2. QAWATCH_CONFIG names a YAML file 3. its values are used."""
    path = write_yaml(tmp_path, "poll:\n  active_interval_s: 0.5\n")
    env.setenv("QAWATCH_CONFIG", str(path))
    assert load_settings(None, None, environ=os.environ).poll.active_interval_s == 0.5


def test_empty_yaml_file_means_defaults(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. an empty YAML file 2. every key has its default."""
    assert load(tmp_path, "") == load(tmp_path)


# ---------------------------------------------------------------------------------------
# poll.waiting_interval_s: the pace while no reply is near its end


def test_waiting_interval_default_is_the_pacing_default(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. nothing set 2. poll.waiting_interval_s is 5 s 3. the daemon's Pacing built from the
    settings (as app.py and cli.py do) is the Pacing that oneshot defaults to."""
    settings = load(tmp_path)
    assert settings.poll.waiting_interval_s == DEFAULT_WAITING_INTERVAL_S == 5.0
    assert Pacing(**settings.poll.model_dump()) == Pacing()
    assert redacted(settings)["poll"]["waiting_interval_s"] == 5.0  # check-config shows it
    assert (
        redacted(load(tmp_path, "poll:\n  waiting_interval_s: null\n"))["poll"]["waiting_interval_s"] is None
    )


@pytest.mark.parametrize(
    ("yaml_text", "value"),
    [
        ("poll:\n  waiting_interval_s: null\n", None),
        ("poll:\n  waiting_interval_s: ~\n", None),
        (None, "null"),
        (None, "None"),
        (None, ""),
    ],
)
def test_waiting_interval_null_means_the_active_pace(
    env: pytest.MonkeyPatch, tmp_path: Path, yaml_text: str | None, value: str | None
) -> None:
    """1. poll.waiting_interval_s null in YAML, or null/none/empty in the environment 2. None
    3. a waiting conversation is then polled at the active interval, as before the key."""
    if value is not None:
        env.setenv("QAWATCH_POLL__WAITING_INTERVAL_S", value)
    settings = load(tmp_path, yaml_text)
    assert settings.poll.waiting_interval_s is None
    pacing = Pacing(**settings.poll.model_dump())
    assert next_interval(None, True, pacing, waiting=True) == settings.poll.active_interval_s


def test_waiting_interval_below_active_is_allowed_and_clamped(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1. waiting 1 s below an active 5 s (and one above the idle cap) 2. both load
    3. the waiting pace is clamped: never faster than active, never slower than idle."""
    settings = load(tmp_path, "poll:\n  active_interval_s: 5\n  waiting_interval_s: 1\n")
    assert settings.poll.waiting_interval_s == 1.0
    assert next_interval(None, True, Pacing(**settings.poll.model_dump()), waiting=True) == 5.0
    env.setenv("QAWATCH_POLL__WAITING_INTERVAL_S", "90")
    settings = load(tmp_path, "poll:\n  idle_interval_s: 30\n")
    assert next_interval(None, True, Pacing(**settings.poll.model_dump()), waiting=True) == 30.0


def test_example_config_shows_the_poll_defaults(env: pytest.MonkeyPatch) -> None:
    """1. config/qawatch.example.yaml 2. its poll section is every poll key with its default."""
    example = Path(__file__).parent.parent / "config" / "qawatch.example.yaml"
    poll = yaml.safe_load(example.read_text(encoding="utf-8"))["poll"]
    assert poll == PollSettings().model_dump()


# ---------------------------------------------------------------------------------------
# watch ids from the environment


@pytest.mark.parametrize(
    "value",
    [
        "chat_a,chat-b_c",
        "chat_a, chat-b_c",
        "chat_a chat-b_c",
        '["chat_a", "chat-b_c"]',
    ],
)
def test_watch_ids_from_env_as_list_or_json(env: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    """1. QAWATCH_WATCH__IDS as a comma/space list or a JSON list 2. both ids, in order."""
    env.setenv("QAWATCH_WATCH__IDS", value)
    assert load(tmp_path).watch.ids == ["chat_a", "chat-b_c"]


# ---------------------------------------------------------------------------------------
# every bad key is a ConfigError naming the key

# (id, YAML text or None, env, a fragment the message must contain)
BAD: list[tuple[str, str | None, dict[str, str], str]] = [
    ("yaml-unknown-top", "bogus: 1\n", {}, "bogus"),
    ("yaml-unknown-nested", "api:\n  tokn: x\n", {}, "api.tokn"),
    ("yaml-unknown-sink-key", "sinks:\n  - type: stdout\n    colour: red\n", {}, "sinks.0.colour"),
    ("env-unknown-top", None, {"QAWATCH_BOGUS": "1"}, "QAWATCH_BOGUS"),
    ("env-unknown-nested", None, {"QAWATCH_POLL__SPEED": "1"}, "QAWATCH_POLL__SPEED"),
    ("zero-interval", "poll:\n  active_interval_s: 0\n", {}, "poll.active_interval_s"),
    ("negative-interval", None, {"QAWATCH_POLL__IDLE_INTERVAL_S": "-5"}, "poll.idle_interval_s"),
    ("negative-backoff", "poll:\n  error_backoff_max_s: -1\n", {}, "poll.error_backoff_max_s"),
    ("negative-timeout", "api:\n  timeout_s: -1\n", {}, "api.timeout_s"),
    ("zero-rate", "api:\n  rate_limit_per_s: 0\n", {}, "api.rate_limit_per_s"),
    ("zero-expire", "watch:\n  expire_after_s: 0\n", {}, "watch.expire_after_s"),
    ("jitter-one", "poll:\n  jitter: 1\n", {}, "poll.jitter"),
    ("waiting-zero", "poll:\n  waiting_interval_s: 0\n", {}, "poll.waiting_interval_s"),
    ("waiting-too-long", "poll:\n  waiting_interval_s: 3601\n", {}, "poll.waiting_interval_s"),
    ("waiting-text", "poll:\n  waiting_interval_s: soon\n", {}, "poll.waiting_interval_s"),
    ("waiting-env", None, {"QAWATCH_POLL__WAITING_INTERVAL_S": "-1"}, "poll.waiting_interval_s"),
    ("waiting-env-text", None, {"QAWATCH_POLL__WAITING_INTERVAL_S": "5 s"}, "poll.waiting_interval_s"),
    ("jitter-env", None, {"QAWATCH_POLL__JITTER": "1.5"}, "poll.jitter"),
    (
        "idle-below-active",
        "poll:\n  active_interval_s: 5\n  idle_interval_s: 2\n",
        {},
        "poll.idle_interval_s",
    ),
    ("base-url-scheme", "api:\n  base_url: ftp://api.qa.tech\n", {}, "api.base_url"),
    ("base-url-no-host", None, {"QAWATCH_API__BASE_URL": "http://"}, "api.base_url"),
    ("base-url-space", "api:\n  base_url: 'http://a b'\n", {}, "api.base_url"),
    ("base-url-port-too-big", None, {"QAWATCH_API__BASE_URL": "http://127.0.0.1:65536"}, "api.base_url"),
    ("base-url-port-0", "api:\n  base_url: 'http://127.0.0.1:0'\n", {}, "api.base_url"),
    ("base-url-port-only", "api:\n  base_url: 'http://:8080/v1'\n", {}, "api.base_url"),
    ("webhook-url-port", "sinks:\n  - {type: webhook, url: 'http://h:0/x'}\n", {}, "sinks.0.url"),
    (
        "webhook-header-line-break",
        "sinks:\n  - type: webhook\n    url: https://h.example/x\n"
        "    headers:\n      X-Team: |\n        qa\n",
        {},
        "sinks.0.headers",
    ),
    ("retention-zero", "state:\n  retention_days: 0\n", {}, "state.retention_days"),
    ("id-chat-underscore", "watch:\n  ids: [chat_]\n", {}, "watch.ids.0"),
    ("id-space", "watch:\n  ids: [chat_a, 'bad id']\n", {}, "watch.ids.1"),
    ("id-slash", "watch:\n  ids: ['chat_a/b']\n", {}, "watch.ids.0"),
    ("id-env", None, {"QAWATCH_WATCH__IDS": "chat_ok,nochat"}, "watch.ids.1"),
    ("id-env-bad-json", None, {"QAWATCH_WATCH__IDS": '["chat_a",'}, "watch.ids"),
    ("backfill", "watch:\n  backfill: all\n", {}, "watch.backfill"),
    ("log-level", None, {"QAWATCH_LOG__LEVEL": "verbose"}, "log.level"),
    ("log-format", "log:\n  format: xml\n", {}, "log.format"),
    ("sink-type", "sinks:\n  - type: kafka\n", {}, "sinks.0"),
    ("sink-no-type", "sinks:\n  - path: /tmp/x\n", {}, "sinks.0"),
    ("file-sink-no-path", "sinks:\n  - type: stdout\n  - type: file\n", {}, "sinks.1.path"),
    (
        "duplicate-sink-names",
        "sinks:\n  - {type: stdout, name: out}\n  - {type: file, path: x.ndjson, name: out}\n",
        {},
        "sinks:",
    ),
    (
        "duplicate-default-sink-names",
        "sinks:\n  - {type: stdout}\n  - {type: file, path: b.ndjson, name: stdout}\n",
        {},
        "sinks:",
    ),
    ("sinks-not-a-list", "sinks: {type: stdout}\n", {}, "sinks"),
    ("token-and-token-file", "api:\n  token: abc\n  token_file: /x\n", {}, "api.token"),
    (
        "token-env-and-token-file-yaml",
        "api:\n  token_file: /x\n",
        {"QAWATCH_API__TOKEN": "abc"},
        "api.token",
    ),
    ("section-not-mapping", "api: 42\n", {}, "api"),
    # a control character in a path: a NUL fails every file call ("embedded null byte")
    ("state-path-nul", 'state:\n  path: "state\\0.db"\n', {}, "state.path"),
    ("state-path-newline-env", None, {"QAWATCH_STATE__PATH": "state\n.db"}, "state.path"),
    ("file-sink-path-nul", 'sinks:\n  - {type: file, path: "out\\0.ndjson"}\n', {}, "sinks.0.path"),
    ("file-sink-path-escape", 'sinks:\n  - {type: file, path: "out\\e.ndjson"}\n', {}, "sinks.0.path"),
    ("watch-file-nul", 'watch:\n  file: "ids\\0.txt"\n', {}, "watch.file"),
    ("watch-file-c1", 'watch:\n  file: "ids\\x85.txt"\n', {}, "watch.file"),
    ("token-file-nul", 'api:\n  token_file: "/run/token\\0"\n', {}, "api.token_file"),
    ("token-file-tab-env", None, {"QAWATCH_API__TOKEN_FILE": "/run/tok\ten"}, "api.token_file"),
    (
        "webhook-secret-file-nul",
        'sinks:\n  - {type: webhook, url: "https://h.example/x", secret_file: "/s\\0"}\n',
        {},
        "sinks.0.secret_file",
    ),
]


@pytest.mark.parametrize(("yaml_text", "environ", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_setting_is_a_config_error_naming_the_key(
    env: pytest.MonkeyPatch,
    tmp_path: Path,
    yaml_text: str | None,
    environ: dict[str, str],
    key: str,
) -> None:
    """1. one bad setting in YAML or env 2. ConfigError 3. one line, naming the dotted key."""
    for name, value in environ.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    message = str(caught.value)
    assert message.startswith("config error: ")
    assert "\n" not in message
    # the key as a whole dotted word ("api.token" must not be satisfied by "api.token_file")
    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message), message


def test_paths_with_ordinary_odd_characters_are_accepted(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. paths with spaces, non-ASCII letters, # and % 2. they load unchanged (only control
    characters are refused)."""
    settings = load(tmp_path, 'state:\n  path: "my state/é #1 %20.db"\nwatch:\n  file: "ids é.txt"\n')
    assert settings.state.path == tmp_path / "my state/é #1 %20.db"
    assert settings.watch.file == tmp_path / "ids é.txt"


def test_relative_paths_in_the_yaml_file_follow_the_file(
    env: pytest.MonkeyPatch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. a YAML file in conf/ names relative paths 2. run from another folder 3. they are
    relative to conf/, as docker compose does; absolute ones and the environment's are kept."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "qawatch.yaml").write_text(
        "state:\n  path: state.db\nwatch:\n  file: ids.txt\n"
        "sinks:\n  - type: file\n    name: rel\n    path: out/replies.ndjson\n  - type: file\n    name: abs\n"
        f"    path: {tmp_path / 'abs.ndjson'}\n"
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings(conf / "qawatch.yaml", environ={})
    assert settings.state.path == conf / "state.db"
    assert settings.watch.file == conf / "ids.txt"
    assert [getattr(sink, "path", None) for sink in settings.sinks] == [
        conf / "out/replies.ndjson",
        tmp_path / "abs.ndjson",
    ]
    env.setenv("QAWATCH_STATE__PATH", "env.db")
    from_env = load_settings(conf / "qawatch.yaml", environ=os.environ)
    assert from_env.state.path == Path("env.db")


def test_an_unknown_key_is_named_where_it_was_written(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. the same typo in the YAML file and in the environment 2. named as watch.idz for the
    file and as QAWATCH_WATCH__IDZ for the environment."""
    with pytest.raises(ConfigError, match=r"watch\.idz: unknown key"):
        load(tmp_path, "watch:\n  idz: [chat_a]\n")
    env.setenv("QAWATCH_WATCH__IDZ", "chat_a")
    with pytest.raises(ConfigError, match=r"QAWATCH_WATCH__IDZ: unknown setting in the environment"):
        load(tmp_path)


def test_duplicate_sink_names_message_names_the_name(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. two sinks named 'out' 2. the message says which key and which name."""
    with pytest.raises(ConfigError, match=r"sinks: .*'out'"):
        load(tmp_path, "sinks:\n  - {type: stdout, name: out}\n  - {type: file, path: x, name: out}\n")


@pytest.mark.parametrize("kind", ["file", "webhook"])
def test_sinks_that_share_a_type_get_names_from_their_destination(
    env: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    """1. two sinks of one type without names 2. each is named after its destination
    (`file-3f9a0c1e`), so reordering or removing one never hands its queue to the other
    3. a name given is kept, and a sink alone of its type still defaults to the type."""
    one, two = {
        "file": ("path: a.ndjson", "path: b.ndjson"),
        "webhook": ("url: 'https://user:pw@hooks.example.com/a'", "url: 'https://hooks.example.com/b'"),
    }[kind]
    first = sink_names(load(tmp_path, f"sinks:\n  - {{type: {kind}, {one}}}\n  - {{type: {kind}, {two}}}\n"))
    swapped = sink_names(
        load(tmp_path, f"sinks:\n  - {{type: {kind}, {two}}}\n  - {{type: {kind}, {one}}}\n")
    )
    assert first == swapped[::-1]
    assert all(re.fullmatch(rf"{kind}-[0-9a-f]{{8}}", name) for name in first), first
    assert first[0] != first[1]
    named = load(
        tmp_path,
        f"sinks:\n  - {{type: {kind}, {one}, name: a}}\n  - {{type: {kind}, {two}}}\n  - {{type: stdout}}\n",
    )
    assert sink_names(named) == ["a", first[1], "stdout"]
    assert sink_names(load(tmp_path, f"sinks:\n  - {{type: {kind}, {one}}}\n")) == [kind]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- chat_a\n- chat_b\n", "mapping"),
        ("just a sentence\n", "mapping"),
        ("api:\n  base_url: [1, 2\n", "line"),
        ("api:\n  token: x\n   base_url: y\n", "line"),
    ],
    ids=["list", "scalar", "unclosed", "indent"],
)
def test_yaml_that_is_not_a_mapping_or_not_yaml(
    env: pytest.MonkeyPatch, tmp_path: Path, text: str, fragment: str
) -> None:
    """1. a YAML file that is a list, a scalar or broken 2. ConfigError naming the file."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert "qawatch.yaml" in message
    assert fragment in message
    assert "\n" not in message


def test_missing_config_file(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. --config names a file that does not exist 2. ConfigError naming --config and the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"--config: .*nope\.yaml"):
        load_settings(missing, None, environ=os.environ)


def test_config_file_that_is_not_text(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. --config names a binary file 2. ConfigError naming --config (not a UnicodeDecodeError)."""
    path = tmp_path / "state.db"
    path.write_bytes(b"SQLite format 3\x00\xff\xfe\x81")
    with pytest.raises(ConfigError, match=r"--config: .*state\.db is not UTF-8"):
        load_settings(path, None, environ=os.environ)


def test_missing_config_file_from_qawatch_config(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. QAWATCH_CONFIG names a missing file 2. ConfigError rather than silent defaults."""
    env.setenv("QAWATCH_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match=r"gone\.yaml"):
        load_settings(None, None, environ=os.environ)


def test_flag_override_is_validated_too(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. a flag gives a bad base URL 2. ConfigError naming api.base_url."""
    with pytest.raises(ConfigError, match=r"api\.base_url"):
        load(tmp_path, None, {"api": {"base_url": "not a url"}})


# ---------------------------------------------------------------------------------------
# the token: token, token_file, $CREDENTIALS_DIRECTORY


def test_token_from_env_wins_and_is_stripped(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. QAWATCH_API__TOKEN with a trailing newline 2. resolve_token returns it stripped."""
    env.setenv("QAWATCH_API__TOKEN", SECRET + "\n")
    assert resolve_token(load(tmp_path), environ=os.environ) == SECRET


def test_token_file_is_read_by_resolve_token(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. api.token_file points at a file 2. load_settings does not need it to exist yet
    3. resolve_token reads and strips it."""
    token_file = tmp_path / "token"
    settings = load(tmp_path, f"api:\n  token_file: {token_file}\n")
    token_file.write_text(f"  {SECRET}\n", encoding="utf-8")
    assert resolve_token(settings, environ=os.environ) == SECRET


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank"])
def test_empty_token_file_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path, content: str) -> None:
    """1. the token file is empty or blank 2. ConfigError naming api.token_file."""
    token_file = tmp_path / "token"
    token_file.write_text(content, encoding="utf-8")
    settings = load(tmp_path, f"api:\n  token_file: {token_file}\n")
    with pytest.raises(ConfigError, match=r"api\.token_file: .* is empty"):
        resolve_token(settings, environ=os.environ)


def test_token_file_that_is_not_text_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. the token file holds bytes that are not UTF-8 2. ConfigError naming api.token_file."""
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xff\xfe\x00secret")
    settings = load(tmp_path, f"api:\n  token_file: {token_file}\n")
    with pytest.raises(ConfigError, match=r"api\.token_file: .* not UTF-8"):
        resolve_token(settings, environ=os.environ)


def test_unreadable_token_file_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. the token file does not exist 2. ConfigError naming api.token_file."""
    settings = load(tmp_path, f"api:\n  token_file: {tmp_path / 'absent'}\n")
    with pytest.raises(ConfigError, match=r"api\.token_file: cannot read"):
        resolve_token(settings, environ=os.environ)


def test_empty_token_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. QAWATCH_API__TOKEN is blank 2. ConfigError naming api.token."""
    env.setenv("QAWATCH_API__TOKEN", "  ")
    with pytest.raises(ConfigError, match=r"api\.token: is empty"):
        resolve_token(load(tmp_path), environ=os.environ)


def test_credentials_directory_fallback(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. no token configured 2. $CREDENTIALS_DIRECTORY/token exists 3. it is the token."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text(SECRET + "\n", encoding="utf-8")
    settings = load(tmp_path)
    assert resolve_token(settings, environ={"CREDENTIALS_DIRECTORY": str(creds)}) == SECRET


def test_configured_token_beats_credentials_directory(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. a token in env and a systemd credential 2. the configured token is used."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("from-credentials", encoding="utf-8")
    env.setenv("QAWATCH_API__TOKEN", SECRET)
    assert resolve_token(load(tmp_path), environ={"CREDENTIALS_DIRECTORY": str(creds)}) == SECRET


def test_empty_credential_is_an_error(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. $CREDENTIALS_DIRECTORY/token is empty 2. ConfigError naming where it looked."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY/token: .* is empty"):
        resolve_token(load(tmp_path), environ={"CREDENTIALS_DIRECTORY": str(creds)})


def test_no_token_anywhere(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. no token, no token file, credentials folder without a token 2. ConfigError naming api.token."""
    (tmp_path / "creds").mkdir()
    with pytest.raises(ConfigError, match=r"api\.token: no API token"):
        resolve_token(load(tmp_path), environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})


# ---------------------------------------------------------------------------------------
# secrets stay hidden


def test_redacted_hides_api_and_control_tokens(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. api.token and control.token set 2. redacted() shows '***' for both
    3. the secret is nowhere in its YAML dump, nor in repr(settings)."""
    env.setenv("QAWATCH_API__TOKEN", SECRET)
    env.setenv("QAWATCH_CONTROL__TOKEN", SECRET + "-control")
    settings = load(tmp_path)
    data = redacted(settings)
    assert data["api"]["token"] == "***"
    assert data["control"]["token"] == "***"
    assert data["api"]["base_url"] == "https://api.qa.tech"  # the rest is shown
    assert SECRET not in yaml.safe_dump(data)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_redacted_leaves_unset_secrets_null(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """1. no tokens set 2. redacted() shows null, not '***' (nothing to hide)."""
    data = redacted(load(tmp_path))
    assert data["api"]["token"] is None
    assert data["control"]["token"] is None


# (id, YAML text or None, env) where the secret is part of a bad configuration
SECRET_IN_BAD_CONFIG: list[tuple[str, str | None, dict[str, str]]] = [
    ("yaml-token-int", "api:\n  token: 4815162342\n", {}),
    ("yaml-token-list", f"api:\n  token: [{SECRET}]\n", {}),
    ("yaml-control-token-map", f"control:\n  token: {{k: {SECRET}}}\n", {}),
    ("yaml-token-and-file", f"api:\n  token: {SECRET}\n  token_file: /x\n", {}),
    ("yaml-token-next-to-bad-key", f"api:\n  token: {SECRET}\n  timeout_s: -1\n", {}),
    ("yaml-section-is-token", f"api: {SECRET}\n", {}),
    ("yaml-broken-around-token", f"api:\n  token: {SECRET}\n   base_url: [\n", {}),
    ("env-api-json-broken", None, {"QAWATCH_API": f'{{"token": "{SECRET}",'}),
    ("env-api-json-unknown", None, {"QAWATCH_API": f'{{"token": "{SECRET}", "x": 1}}'}),
    ("env-token-and-file", "api:\n  token_file: /x\n", {"QAWATCH_API__TOKEN": SECRET}),
    ("env-unknown-var", None, {"QAWATCH_APITOKEN": SECRET}),
]


@pytest.mark.parametrize(
    ("yaml_text", "environ"),
    [s[1:] for s in SECRET_IN_BAD_CONFIG],
    ids=[s[0] for s in SECRET_IN_BAD_CONFIG],
)
def test_secret_never_in_config_error(
    env: pytest.MonkeyPatch, tmp_path: Path, yaml_text: str | None, environ: dict[str, str]
) -> None:
    """1. a configuration with a secret in it fails validation 2. ConfigError
    3. the secret (nor the int token) is not in the message."""
    for name, value in environ.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, yaml_text)
    message = str(caught.value)
    assert SECRET not in message
    assert "4815162342" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass@host/qa", "https://user:***@host/qa"),
        ("https://tok-only@host/qa", "https://***@host/qa"),
        ("https://host/qa?key=abc&team=qa#top", "https://host/qa?key=***&team=***#top"),
        ("https://u:p@host:8443/?sig=x@y", "https://u:***@host:8443/?sig=***"),
        ("https://host/path@not-userinfo", "https://host/path@not-userinfo"),
        ("https://api.qa.tech", "https://api.qa.tech"),
    ],
)
def test_mask_url_hides_passwords_and_query_values(url: str, shown: str) -> None:
    """1. a URL with userinfo and/or a query string 2. mask_url shows the password and every
    query value as ***, and leaves the rest (and URLs without credentials) alone."""
    assert mask_url(url) == shown
