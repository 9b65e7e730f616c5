# qawatch container image.
#
#   docker build -t qawatch .
#   docker run -d --name qawatch --read-only --tmpfs /tmp -e QAWATCH_WATCH__IDS=chat_abc \
#     -v "$PWD/qawatch.token:/run/secrets/qawatch_token:ro" \
#     -e QAWATCH_API__TOKEN_FILE=/run/secrets/qawatch_token \
#     -v qawatch-state:/var/lib/qawatch qawatch
#
# The token: a file (readable by uid 10001) named by QAWATCH_API__TOKEN_FILE, as compose.yaml's
# `secrets:` does; QAWATCH_API__TOKEN works too, but shows in `docker inspect`.
# Configuration: QAWATCH_* environment variables, or a YAML file mounted at
# /etc/qawatch/qawatch.yaml together with -e QAWATCH_CONFIG=/etc/qawatch/qawatch.yaml
# (not set here: qawatch refuses to start when QAWATCH_CONFIG names a missing file).
# The environment beats the YAML, so the image's QAWATCH_STATE__PATH wins over state.path.
# State (SQLite: watch set, cursors, delivery queue) lives in the /var/lib/qawatch volume;
# file sinks write into the /var/log/qawatch volume, e.g. path: /var/log/qawatch/replies.ndjson
# (with a read-only root filesystem, the volumes and a /tmp tmpfs are all that is writable).
# The control API stays on 127.0.0.1:8787 inside the container (the HEALTHCHECK uses it);
# to publish it, set QAWATCH_CONTROL__LISTEN=0.0.0.0:8787 and QAWATCH_CONTROL__TOKEN.
#
# Dependencies come from requirements.lock: exact versions with their sha256 hashes, so two
# builds install the same files (regenerate it with `make lock` after changing pyproject.toml).

# --- builder: a virtualenv at /opt/qawatch holding qawatch and its dependencies ----------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/qawatch

# Dependencies first, from the lock alone: this layer is reused until the lock changes.
# --require-hashes: every file must match a hash in the lock; --only-binary: wheels only, so no
# sdist is built with unpinned build tools. The lock also pins setuptools, the build backend.
WORKDIR /src
COPY requirements.lock ./
RUN /opt/qawatch/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock

# Then the package itself, as a wheel built with the locked setuptools (--no-build-isolation: no
# unpinned download). It installs from the wheel alone (--no-index), its dependencies resolved
# against what the lock installed: a dependency of pyproject.toml missing from the lock, or pinned
# outside its range, fails the build here. pip and setuptools then leave the venv, which only has
# to run qawatch.
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN /opt/qawatch/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && /opt/qawatch/bin/pip install --no-index --find-links /tmp/wheels 'qawatch[fast]' \
    && /opt/qawatch/bin/pip check \
    && /opt/qawatch/bin/pip uninstall --yes --quiet pip setuptools \
    && /opt/qawatch/bin/qawatch --version

# --- runtime: the virtualenv only, no compilers, no pip, a non-root user -----------------
FROM python:3.11-slim

ARG QAWATCH_UID=10001
RUN groupadd --gid "${QAWATCH_UID}" qawatch \
    && useradd --uid "${QAWATCH_UID}" --gid qawatch --no-create-home --no-log-init \
        --home-dir /var/lib/qawatch --shell /usr/sbin/nologin qawatch \
    && mkdir -p /var/lib/qawatch /var/log/qawatch /etc/qawatch \
    && chown qawatch:qawatch /var/lib/qawatch /var/log/qawatch \
    && chmod 0750 /var/lib/qawatch /var/log/qawatch

ENV PATH=/opt/qawatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    QAWATCH_STATE__PATH=/var/lib/qawatch/state.db

WORKDIR /var/lib/qawatch
# state, and the folder for file sinks; a new named volume takes the folder's owner (uid 10001)
VOLUME ["/var/lib/qawatch", "/var/log/qawatch"]

# Control API, /metrics, /healthz, /readyz: loopback only unless configured (see above).
EXPOSE 8787
STOPSIGNAL SIGTERM
# `qawatch health` exits 0 when the daemon's /readyz (on control.listen) says ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["qawatch", "health"]

# Last, what changes with every commit (everything above stays cached).
COPY config/qawatch.example.yaml /etc/qawatch/qawatch.example.yaml
COPY --from=builder /opt/qawatch /opt/qawatch

USER ${QAWATCH_UID}:${QAWATCH_UID}
ENTRYPOINT ["qawatch"]
CMD ["run"]
