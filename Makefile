# qawatch: `make demo` and `make test` work on a machine with only Python 3.11+, pip and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
RUN    := $(VENV)/.installed
NEEDS_PYTHON := import sys; sys.exit(sys.version_info < (3, 11))

# a virtualenv left by an older Python (or a broken one) is made again, not kept
ifneq ($(wildcard $(BIN)/python),)
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)  # not under make -n
ifneq ($(shell $(BIN)/python -c '$(NEEDS_PYTHON)' >/dev/null 2>&1 && echo ok),ok)
$(info qawatch: $(VENV) was made by a Python older than 3.11 (or is broken): making it again)
$(shell rm -rf '$(VENV)')
endif
endif
endif

.PHONY: demo test lint typecheck unit proptest bench chaos soak venv clean

$(BIN)/python:
	@$(PYTHON) -c '$(NEEDS_PYTHON)' 2>/dev/null || { echo "qawatch needs Python 3.11 or newer;" \
	  "$(PYTHON) is $$($(PYTHON) -V 2>&1). Run e.g. 'make PYTHON=python3.12 test'."; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

venv: $(STAMP)

demo: $(RUN)
	$(BIN)/qawatch demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

# the detector's property tests with thousands of examples per property (make test runs 400)
proptest: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest tests/test_detect_props.py

# bench: the performance issue's figures 1-11 on this machine (about 4 minutes on 2 cores), a table
# with each target and bench/results/latest.json; with the `fast` extra (uvloop, orjson) as the
# image has it. BENCH_ARGS='--only 1,2' measures some figures, '--quick' smaller and shorter runs.
FAST := $(VENV)/.installed-fast
BENCH_ARGS ?=
$(FAST): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,fast]'
	touch $@

bench: $(STAMP) $(FAST)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# chaos: `qawatch run` killed with SIGKILL 20 times during 200 replies, with every upstream
# fault class on a share of GETs; prints lost / repeated / kills and fails on any loss.
# CI runs a short form (CHAOS_ARGS='--replies 60 --kills 5 --chats 10 --faults').
CHAOS_ARGS ?= --replies 200 --kills 20 --faults
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

# soak: 1,000 watches for 3 minutes; prints the daemon's RSS growth after the warm-up
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The image, without a Docker engine: build it with ../shared/tools/container-check (buildah),
# check --version, and run `qawatch watch` inside it against the simulator on the host.
SHARED ?= $(CURDIR)/../shared
CONTAINER_CHECK ?= $(SHARED)/tools/container-check

.PHONY: container-check
container-check: $(RUN)
	CONTAINER_CHECK='$(CONTAINER_CHECK)' QAWATCH='$(BIN)/qawatch' PYTHON='$(BIN)/python' bash .ci/container-check.sh

# systemd-check: the unit passes `systemd-analyze verify` silently and its exposure score
# (`systemd-analyze security --offline=yes`) is at most SYSTEMD_MAX_EXPOSURE. CI runs as root
# on Debian, so a missing systemd-analyze is installed with apt-get.
# verify insists that ExecStart's binary exists, and /opt/qawatch/bin/qawatch only exists on
# an installed host; so verify checks a temporary copy of the unit whose ExecStart binary is
# rewritten to /bin/true, and every other line (ExecReload's /bin/sh included) as shipped.
SYSTEMD_UNIT         := systemd/qawatch.service
SYSTEMD_MAX_EXPOSURE := 1.5

.PHONY: systemd-check
systemd-check:
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	sed 's|^ExecStart=/opt/qawatch/bin/qawatch |ExecStart=/bin/true |' $(SYSTEMD_UNIT) > "$$tmp/qawatch.service" && \
	grep -q '^ExecStart=/bin/true ' "$$tmp/qawatch.service" || { echo "systemd-check: no ExecStart=/opt/qawatch/bin/qawatch in $(SYSTEMD_UNIT)"; exit 1; }; \
	out=$$(systemd-analyze verify "$$tmp/qawatch.service" 2>&1); status=$$?; \
	if [ $$status -ne 0 ] || [ -n "$$out" ]; then echo "$$out"; echo "systemd-check: verify is not clean (exit $$status)"; exit 1; fi; \
	echo "systemd-analyze verify $(SYSTEMD_UNIT): clean"
	@report=$$(systemd-analyze security --offline=yes $(SYSTEMD_UNIT) 2>&1); \
	score=$$(printf '%s\n' "$$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'); \
	if [ -z "$$score" ]; then echo "$$report"; echo "systemd-check: no exposure score in the output"; exit 1; fi; \
	echo "systemd-analyze security $(SYSTEMD_UNIT): exposure $$score (limit $(SYSTEMD_MAX_EXPOSURE))"; \
	awk -v s="$$score" -v max="$(SYSTEMD_MAX_EXPOSURE)" 'BEGIN { exit !(s + 0 <= max + 0) }' || \
	{ printf '%s\n' "$$report" | grep -v '✓'; echo "systemd-check: exposure $$score is above $(SYSTEMD_MAX_EXPOSURE)"; exit 1; }

# systemd-live-check: the unit under a real systemd (PID 1 of a systemd-nspawn container, a Debian 12
# rootfs cached under /var/tmp): notify, watchdog, reload, credentials, the sandbox in force,
# restart, stop, journal. Needs root; about 90 s warm, 2-3 min the first time.
SYSTEMD_LIVE_CHECK ?= $(SHARED)/tools/systemd-live-check

.PHONY: systemd-live-check
systemd-live-check:
	'$(SYSTEMD_LIVE_CHECK)' '$(CURDIR)'

# lock: regenerate requirements.lock, the image's dependencies (the runtime ones of pyproject.toml
# and the build backend) at exact versions with the sha256 of every file PyPI has for them, after
# a change to [project] dependencies (pins stay where they still fit; LOCK_FLAGS=--upgrade moves
# them all to the newest). pip-tools runs in a venv of its own, against pip's default index only
# (no local indexes or wheel folders from pip's configuration: their hashes would not be PyPI's).
LOCK_FLAGS ?=
LOCK_TOOLS := $(VENV)/pip-tools

.PHONY: lock
lock: | $(BIN)/python
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(BIN)/python -m venv $(LOCK_TOOLS) && \
	  $(LOCK_TOOLS)/bin/python -m pip install --quiet pip-tools; }
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
	  $(LOCK_TOOLS)/bin/pip-compile --quiet $(LOCK_FLAGS) --generate-hashes --allow-unsafe --strip-extras --extra fast \
	  --build-deps-for=wheel --no-emit-index-url --no-emit-find-links \
	  --output-file=requirements.lock pyproject.toml
