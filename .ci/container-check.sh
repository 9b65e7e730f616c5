#!/usr/bin/env bash
# `make container-check`: build the Dockerfile (with ../shared/tools/container-check, which needs
# no Docker engine), check its metadata (non-root USER, ENTRYPOINT/CMD, VOLUME, STOPSIGNAL,
# HEALTHCHECK) and --version, then run `qawatch watch` inside the
# image against the simulator running on the host, and expect exit 0 and a completed reply.
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
sim_pid=
cleanup() {
  if [[ -n $sim_pid ]]; then kill "$sim_pid" 2>/dev/null || true; wait "$sim_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

step "build"
start=$SECONDS
"$cc" build
echo "container-check: built in $((SECONDS - start)) s" >&2

step "metadata"
"$cc" inspect >"$work/inspect.json"
"$python" - "$work/inspect.json" <<'PY'
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
if "/var/lib/qawatch" not in (cfg.get("Volumes") or {}):
    problems.append("no VOLUME /var/lib/qawatch")
if cfg.get("StopSignal") != "SIGTERM":
    problems.append(f"stop signal is {cfg.get('StopSignal')!r}")
health = (docker_cfg.get("Healthcheck") or {}).get("Test")
if health != ["CMD", "qawatch", "health"]:
    problems.append(f"healthcheck is {health!r}")
print(f"user {user}, entrypoint {cfg.get('Entrypoint')}, cmd {cfg.get('Cmd')}, "
      f"volumes {sorted(cfg.get('Volumes') or {})}, healthcheck {health}", file=sys.stderr)
if problems:
    sys.exit("container-check: FAILED: " + "; ".join(problems))
PY

step "--version"
want="qawatch $("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
got=$("$cc" run -- --version)
echo "$got"
[[ $got == "$want" ]] || fail "--version printed '$got', expected '$want'"

step "watch, inside the image, against the simulator on the host"
# The reply takes a few seconds, so the watch starts while it is pending and has to poll for it.
"$qawatch" simulate --port 0 --chats 1 --reply-seconds "${REPLY_SECONDS:-6}" >"$work/sim.out" 2>"$work/sim.err" &
sim_pid=$!
for _ in $(seq 100); do
  [[ -s $work/sim.out && $(wc -l <"$work/sim.out") -ge 2 ]] && break
  kill -0 "$sim_pid" 2>/dev/null || { cat "$work/sim.err" >&2; fail "the simulator exited"; }
  sleep 0.1
done
url=$(sed -n 's/^qawatch simulator listening on \([^ ]*\) .*/\1/p' "$work/sim.out")
chat=$(sed -n 2p "$work/sim.out")
[[ -n $url && -n $chat ]] || { cat "$work/sim.out" "$work/sim.err" >&2; fail "no URL or chat id from the simulator"; }
echo "simulator at $url, chat $chat" >&2

start=$SECONDS
status=0
"$cc" run --env QAWATCH_API__TOKEN=sim-token --env "QAWATCH_API__BASE_URL=$url" \
  -- watch --timeout 30 "$chat" >"$work/watch.out" || status=$?
cat "$work/watch.out"
echo "container-check: watch exited $status after $((SECONDS - start)) s" >&2
((status == 0)) || fail "qawatch watch exited $status"
"$python" - "$work/watch.out" "$chat" <<'PY'
import json, sys
path, chat = sys.argv[1:]
for line in open(path):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if event.get("type") == "chat.reply.completed" and event["data"]["conversation"]["shortId"] == chat:
        sys.exit(0)
sys.exit(f"container-check: FAILED: no chat.reply.completed event for {chat} on stdout")
PY

echo "container-check: OK" >&2
