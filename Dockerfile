# qawatch container image.
#
#   docker build -t qawatch .
#   docker run -d --name qawatch -e QAWATCH_API__TOKEN -e QAWATCH_WATCH__IDS=chat_abc \
#     -v qawatch-state:/var/lib/qawatch qawatch
#
# Configuration: QAWATCH_* environment variables, or a YAML file mounted at
# /etc/qawatch/qawatch.yaml together with -e QAWATCH_CONFIG=/etc/qawatch/qawatch.yaml
# (not set here: qawatch refuses to start when QAWATCH_CONFIG names a missing file).
# The environment beats the YAML, so the image's QAWATCH_STATE__PATH wins over state.path.
# State (SQLite: watch set, cursors, delivery queue) lives in the /var/lib/qawatch volume.
# The control API stays on 127.0.0.1:8787 inside the container (the HEALTHCHECK uses it);
# to publish it, set QAWATCH_CONTROL__LISTEN=0.0.0.0:8787 and QAWATCH_CONTROL__TOKEN.

# --- builder: a virtualenv at /opt/qawatch holding qawatch and its dependencies ----------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/qawatch

# Dependencies first, from pyproject.toml alone: this layer is reused until they change.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && /opt/qawatch/bin/pip install -r /tmp/requirements.txt

# Then the package itself, as a wheel (no editable install, no sources left behind);
# pip and setuptools leave the venv, which only has to run qawatch.
COPY README.md ./
COPY daemon ./daemon
RUN /opt/qawatch/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/qawatch/bin/pip install --no-deps /tmp/wheels/qawatch-*.whl \
    && /opt/qawatch/bin/pip uninstall --yes --quiet pip setuptools \
    && /opt/qawatch/bin/qawatch --version

# --- runtime: the virtualenv only, no compilers, no pip, a non-root user -----------------
FROM python:3.11-slim

ARG QAWATCH_UID=10001
RUN groupadd --gid "${QAWATCH_UID}" qawatch \
    && useradd --uid "${QAWATCH_UID}" --gid qawatch --no-create-home --no-log-init \
        --home-dir /var/lib/qawatch --shell /usr/sbin/nologin qawatch \
    && mkdir -p /var/lib/qawatch /etc/qawatch \
    && chown qawatch:qawatch /var/lib/qawatch \
    && chmod 0750 /var/lib/qawatch

ENV PATH=/opt/qawatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    QAWATCH_STATE__PATH=/var/lib/qawatch/state.db

WORKDIR /var/lib/qawatch
VOLUME ["/var/lib/qawatch"]

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
