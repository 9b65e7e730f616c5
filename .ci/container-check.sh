#!/usr/bin/env bash
# `make container-check`: check that requirements.lock pins (with hashes) every dependency of
# pyproject.toml, build the Dockerfile (with ../shared/tools/container-check, which needs no Docker
# engine; the build installs from the lock with --require-hashes), check its metadata (non-root
# USER, ENTRYPOINT/CMD, VOLUMEs, STOPSIGNAL, HEALTHCHECK) and --version, then, inside the image
# against the simulator running on the host: `qawatch watch` with the token in a file mounted as
# compose's `secrets:` does (exit 0 and a completed reply), and `qawatch run` with a file sink in
# the /var/log/qawatch volume (the reply lands in the host folder mounted there).
#
#   CONTAINER_CHECK  the container-check tool (default: ../shared/tools/container-check)
#   QAWATCH          the host's qawatch, for the simulator (default: .venv/bin/qawatch)
#   PYTHON           a Python 3.11+ for parsing (default: .venv/bin/python)
#   REPLY_SECONDS    how long the simulated reply takes (default 6: the watch has to poll for it)
set -euo pipefail
cd "$(dirname "$0")/.."

cc=${CONTAINER_CHECK:-../shared/tools/container-check}
qawatch=${QAWATCH:-.venv/bin/qawatch}
python=${PYTHON:-.venv/bin/python}
# Build in Docker's image format: the OCI format has no HEALTHCHECK and buildah would drop it.
# (BUILDAH_LAYERS=true caches steps as Docker does, but with container-check's vfs storage every
# cached step is a full copy of the image, which makes builds here about 3x slower, not faster.)
export BUILDAH_FORMAT=${BUILDAH_FORMAT:-docker}

step() { printf '\n== container-check: %s\n' "$*" >&2; }
fail() { printf 'container-check: FAILED: %s\n' "$*" >&2; exit 1; }

[[ -x $cc ]] || fail "no container-check tool at $cc (set SHARED= or CONTAINER_CHECK=)"
[[ -x $qawatch && -x $python ]] || fail "no $qawatch or $python: run 'make venv' first"

work=$(mktemp -d)
sim_pid= daemon_pid= run_pid=
cleanup() {
  if [[ -n $daemon_pid ]]; then kill "$daemon_pid" 2>/dev/null || true; fi
  if [[ -n $run_pid ]]; then wait "$run_pid" 2>/dev/null || true; fi
  if [[ -n $sim_pid ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step "requirements.lock"
"$python" - <<'PY'
import re, sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # a venv without the dev extras: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
project = tomllib.load(open("pyproject.toml", "rb"))
wanted = [Requirement(r) for r in project["project"]["dependencies"]]
wanted += [Requirement(r) for r in project.get("build-system", {}).get("requires", [])]
pins, unhashed = {}, []
for line in open("requirements.lock").read().replace("\\\n", " ").splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)(.*)", line)
    if not match:
        sys.exit(f"container-check: FAILED: requirements.lock: not an exact pin: {line[:80]!r}")
    name, version, rest = match.groups()
    pins[norm(name)] = version
    if "--hash=sha256:" not in rest:
        unhashed.append(name)
problems = [f"{r} is not pinned" for r in wanted if norm(r.name) not in pins]
problems += [f"{r} is pinned at {pins[norm(r.name)]}" for r in wanted
             if norm(r.name) in pins and not r.specifier.contains(pins[norm(r.name)], prereleases=True)]
problems += [f"{name} has no hash" for name in unhashed]
if problems:
    sys.exit("container-check: FAILED: requirements.lock is out of date with pyproject.toml "
             "(run `make lock`): " + "; ".join(problems))
print(f"requirements.lock: {len(pins)} pins, all hashed, covering pyproject.toml's "
      f"{len(wanted)} runtime and build dependencies", file=sys.stderr)
PY

step "build"
start=$SECONDS
"$cc" build
echo "container-check: built in $((SECONDS - start)) s" >&2

step "metadata"
"$cc" inspect >"$work/inspect.json"
user=$("$python" - "$work/inspect.json" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
cfg = (info.get("OCIv1") or {}).get("config") or {}
docker_cfg = (info.get("Docker") or {}).get("config") or {}
user = cfg.get("User") or ""
problems = []
if user.split(":")[0] in ("", "0", "root"):
    problems.append(f"runs as root (USER {user!r})")
if cfg.get("Entrypoint") != ["qawatch"] or cfg.get("Cmd") != ["run"]:
    problems.append(f"entrypoint/cmd are {cfg.get('Entrypoint')} {cfg.get('Cmd')}")
for volume in ("/var/lib/qawatch", "/var/log/qawatch"):  # state; file sinks
    if volume not in (cfg.get("Volumes") or {}):
        problems.append(f"no VOLUME {volume}")
if cfg.get("StopSignal") != "SIGTERM":
    problems.append(f"stop signal is {cfg.get('StopSignal')!r}")
health = (docker_cfg.get("Healthcheck") or {}).get("Test")
if health != ["CMD", "qawatch", "health"]:
    problems.append(f"healthcheck is {health!r}")
print(f"user {user}, entrypoint {cfg.get('Entrypoint')}, cmd {cfg.get('Cmd')}, "
      f"volumes {sorted(cfg.get('Volumes') or {})}, healthcheck {health}", file=sys.stderr)
if problems:
    sys.exit("container-check: FAILED: " + "; ".join(problems))
print(user)
PY
)

step "--version"
want="qawatch $("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
got=$("$cc" run -- --version)
echo "$got"
[[ $got == "$want" ]] || fail "--version printed '$got', expected '$want'"

step "watch, inside the image, against the simulator on the host"
# The replies take a few seconds, so the watch starts while one is pending and has to poll for it.
"$qawatch" simulate --port 0 --chats 2 --reply-seconds "${REPLY_SECONDS:-6}" >"$work/sim.out" 2>"$work/sim.err" &
sim_pid=$!
for _ in $(seq 100); do
  [[ -s $work/sim.out && $(wc -l <"$work/sim.out") -ge 3 ]] && break
  kill -0 "$sim_pid" 2>/dev/null || { cat "$work/sim.err" >&2; fail "the simulator exited"; }
  sleep 0.1
done
url=$(sed -n 's/^qawatch simulator listening on \([^ ]*\) .*/\1/p' "$work/sim.out")
chat=$(sed -n 2p "$work/sim.out")
chat2=$(sed -n 3p "$work/sim.out")
[[ -n $url && -n $chat && -n $chat2 ]] || { cat "$work/sim.out" "$work/sim.err" >&2; fail "no URL or chat ids from the simulator"; }
echo "simulator at $url, chats $chat $chat2" >&2

# The token as compose.yaml passes it (`secrets:`): a file of the image's user, mode 0400, bind-mounted
# at /run/secrets/qawatch_token and named by api.token_file; never in the environment.
install -d -m 0700 "$work/secrets"
printf 'sim-token\n' >"$work/secrets/qawatch_token"
chown "$user" "$work/secrets/qawatch_token"
chmod 0400 "$work/secrets/qawatch_token"
secret=(--volume "$work/secrets/qawatch_token:/run/secrets/qawatch_token:ro"
  --env QAWATCH_API__TOKEN_FILE=/run/secrets/qawatch_token)

start=$SECONDS
status=0
"$cc" run "${secret[@]}" --env "QAWATCH_API__BASE_URL=$url" \
  -- watch --timeout 30 "$chat" >"$work/watch.out" || status=$?
cat "$work/watch.out"
echo "container-check: watch exited $status after $((SECONDS - start)) s" >&2
((status == 0)) || fail "qawatch watch exited $status"
completed() { # completed FILE CHAT: FILE has a chat.reply.completed event for CHAT
  "$python" - "$1" "$2" <<'PY'
import json, sys
path, chat = sys.argv[1:]
try:
    lines = open(path).read().splitlines()
except OSError:
    sys.exit(1)
for line in lines:
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if event.get("type") == "chat.reply.completed" and event["data"]["conversation"]["shortId"] == chat:
        sys.exit(0)
sys.exit(1)
PY
}
completed "$work/watch.out" "$chat" || fail "no chat.reply.completed event for $chat on stdout"

step "run, inside the image: the token from the secret file, a file sink in the /var/log/qawatch volume"
"$cc" run "${secret[@]}" --env "QAWATCH_API__BASE_URL=$url" --env "QAWATCH_WATCH__IDS=$chat2" \
  --env QAWATCH_CONTROL__LISTEN=127.0.0.1:0 \
  --env 'QAWATCH_SINKS=[{"type":"file","path":"/var/log/qawatch/replies.ndjson"}]' \
  -- run >"$work/run.out" 2>"$work/run.err" &
run_pid=$!
find_daemon() { # the `qawatch run` process at the end of container-check -> buildah -> ... -> python
  local pid=$run_pid child
  while child=$(cat /proc/"$pid"/task/*/children 2>/dev/null | awk '{print $1}') && [[ -n $child ]]; do
    pid=$child
  done
  local cmd
  cmd=$(tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline) || return 1
  # not buildah-chroot-exec, whose arguments are the same: the Python it starts
  [[ $cmd != buildah* && $cmd == *"qawatch run"* ]] && daemon_pid=$pid
}
# buildah mounts a fresh volume at each VOLUME of the image, over a --volume at the same path, so
# the sink's file is read through the daemon's root (/proc/PID/root), not from a host folder.
sink=
for _ in $(seq 300); do
  kill -0 "$run_pid" 2>/dev/null || { cat "$work/run.err" >&2; fail "qawatch run exited"; }
  [[ -n $daemon_pid ]] || find_daemon || true
  if [[ -n $daemon_pid ]]; then
    sink=/proc/$daemon_pid/root/var/log/qawatch/replies.ndjson
    completed "$sink" "$chat2" && break
  fi
  sleep 0.1
done
[[ -n $sink ]] && completed "$sink" "$chat2" || { cat "$work/run.err" >&2; fail "no chat.reply.completed for $chat2 in /var/log/qawatch/replies.ndjson within 30 s"; }
awk '$5 == "/var/log/qawatch" { found = 1 } END { exit !found }' /proc/"$daemon_pid"/mountinfo \
  || fail "/var/log/qawatch is not a mount (a volume) in the container"
echo "container-check: the reply for $chat2 is in /var/log/qawatch/replies.ndjson (a volume): $(wc -l <"$sink") line(s)" >&2
kill -TERM "$daemon_pid"
status=0
wait "$run_pid" || status=$?
daemon_pid= run_pid=
((status == 0)) || { cat "$work/run.err" >&2; fail "qawatch run exited $status on SIGTERM"; }
grep -q 'sim-token' "$work/run.err" "$work/run.out" && fail "the token appears in qawatch run's output"
echo "container-check: qawatch run stopped cleanly on SIGTERM" >&2

echo "container-check: OK" >&2
