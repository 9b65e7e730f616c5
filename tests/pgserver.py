"""PostgreSQL for the tests of the PostgreSQL store (``state.url: postgresql://...``).

Fixtures (conftest.py imports them):

* ``pg_url`` (session): a libpq URL, ``postgresql://user@host:port/dbname``, of a server whose
  user may CREATE and DROP databases. Use it for the server, not for data: see ``pg_db``.
* ``pg_db``: the URL of a fresh, empty database on that server (``TEMPLATE template0``,
  ``ENCODING 'UTF8'``, ``LOCALE 'C'``), for one test; dropped after it ``WITH (FORCE)``, so
  connections left open do not stop the drop.
* ``make_pg_db``: a function that makes one more such database per call (all dropped after
  the test), e.g. to check that two stores do not see each other.

Where the server comes from, the first that applies:

1. ``QAWATCH_TEST_PG=off``: nowhere. The server binaries are hidden and every test that uses
   these fixtures is skipped, to check the skip path on a machine that has PostgreSQL.
2. ``QAWATCH_TEST_PG_URL=postgresql://...``: that server (CI's; see ``.ci/run``). PostgreSQL 13
   or newer (DROP DATABASE ... WITH (FORCE), CREATE DATABASE ... LOCALE).
3. PostgreSQL's server binaries (``initdb``, ``pg_ctl``, ``postgres``) in ``pg_config --bindir``,
   else beside ``initdb`` on PATH, else in the newest ``/usr/lib/postgresql/*/bin``: a
   throwaway cluster for the session (:class:`Cluster`) in a temporary folder: listening on
   127.0.0.1 only, on a free port, its Unix socket in that folder, trust authentication,
   superuser ``postgres``, database ``qawatch_test``; as root, run as the ``postgres`` user
   through ``runuser`` (initdb refuses root). Stopped (``pg_ctl stop -m fast``) and removed at
   the end of the session, also when tests fail.
4. Otherwise every test that uses them is skipped, and pytest's summary (``-ra``) says why.

Both variables are read when this module is imported, because the autouse ``env`` fixture
removes every ``QAWATCH_*`` variable during each test. (``qawatch`` itself refuses unknown
``QAWATCH_*`` variables: do not leave them exported where you run it.)

As a script (CI starts the same cluster before ``make test``; it outlives the command)::

    python tests/pgserver.py bindir        # the server binaries' folder; exit 1 when none
    python tests/pgserver.py start ROOT    # a cluster in the empty folder ROOT; prints its URL
    python tests/pgserver.py stop ROOT     # stops it and removes ROOT
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

URL_ENV = "QAWATCH_TEST_PG_URL"
SWITCH_ENV = "QAWATCH_TEST_PG"
SKIP_REASON = (
    "PostgreSQL tests skipped: set QAWATCH_TEST_PG_URL or install PostgreSQL (apt-get install postgresql)"
)

#: read at import: the autouse ``env`` fixture removes QAWATCH_* variables during each test
_ENV_URL = os.environ.get(URL_ENV) or None
_OFF = os.environ.get(SWITCH_ENV, "").strip().lower() in ("off", "0", "no", "false")

SUPERUSER = "postgres"
TEST_DATABASE = "qawatch_test"
RUN_AS = "postgres"  # the account that runs the cluster when we are root
CONNECT_TIMEOUT_S = 10
_SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
_STATE_FILE = "cluster.json"
# fast and disposable: nothing here has to survive a crash
_SERVER_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = '{socket_dir}'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
log_min_messages = warning
"""


# --- where the server binaries are ------------------------------------------------------------


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in _SERVER_TOOLS)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (-1,)


def find_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries (initdb, pg_ctl, postgres), if any; ``None``
    with ``QAWATCH_TEST_PG=off``."""
    if _OFF:
        return None
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    return next((bindir for bindir in candidates if _has_server(bindir)), None)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server may still take it before we do: retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_dbname(url: str, dbname: str) -> str:
    """``url`` (a ``postgresql://`` URL) naming the database ``dbname`` instead."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"{URL_ENV} must be a postgresql:// URL, not {parts.scheme or 'key=value'!r}")
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key != "dbname"]
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe=""), query=urlencode(query)))


def _admin(url: str, statement: sql.Composed) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute(statement)


def create_database(url: str, name: str) -> None:
    """An empty database ``name`` on ``url``'s server (from template0: nothing of template1's)."""
    _admin(
        url,
        sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'").format(
            sql.Identifier(name)
        ),
    )


def drop_database(url: str, name: str) -> None:
    _admin(url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- a throwaway cluster --------------------------------------------------------------------


class ClusterError(RuntimeError):
    pass


class Cluster:
    """A PostgreSQL cluster in ``root`` (an empty folder it owns and removes on :meth:`stop`):
    data in ``root/data``, the Unix socket and the server log in ``root``."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.port: int | None = None
        #: as root, the cluster runs as this user (initdb and postgres refuse root)
        self.run_as = RUN_AS if os.geteuid() == 0 else None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{TEST_DATABASE}"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / tool), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        # cwd: a folder the cluster's user may enter (as root, ours is often not)
        return subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise ClusterError(
                f"PostgreSQL test cluster: {what} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}"
            )

    def start(self, attempts: int = 3) -> str:
        """initdb, start on a free 127.0.0.1 port, create ``qawatch_test``; the URL of that
        database. On failure everything is stopped and removed again."""
        try:
            self._init()
            for attempt in range(1, attempts + 1):
                self.port = free_port()
                result = self._run(
                    "pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                    "-w", "-t", "60", "-o", f"-p {self.port}",
                )  # fmt: skip
                if result.returncode == 0:
                    break
                if attempt == attempts:  # else: the port was taken meanwhile, most likely
                    self._check(result, "pg_ctl start")
            self._save()
            create_database(with_dbname(self.url, "postgres"), TEST_DATABASE)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _init(self) -> None:
        if self.run_as is not None:
            try:
                account = pwd.getpwnam(self.run_as)
            except KeyError:
                raise ClusterError(
                    f"PostgreSQL test cluster: running as root needs a {self.run_as!r} user to run "
                    "the server as (initdb refuses root); install PostgreSQL's packages, or set "
                    f"{URL_ENV}"
                ) from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self.root.chmod(0o700)
        result = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        self._check(result, "initdb")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(_SERVER_CONF.format(socket_dir=self.root))

    def _save(self) -> None:
        state = {"bindir": str(self.bindir), "port": self.port, "run_as": self.run_as}
        (self.root / _STATE_FILE).write_text(json.dumps(state))

    @classmethod
    def load(cls, root: Path) -> Cluster:
        """The cluster :meth:`start` left in ``root`` (for ``stop`` in another process)."""
        state = json.loads((root / _STATE_FILE).read_text())
        cluster = cls(Path(state["bindir"]), root)
        cluster.port = state["port"]
        cluster.run_as = state["run_as"]
        return cluster

    def stop(self) -> None:
        """Stop the server (fast: connections are ended) and remove ``root``; idempotent."""
        if (self.data / "postmaster.pid").exists():
            result = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
            if result.returncode != 0:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> tuple[Cluster, str] | None:
    """A started throwaway cluster and its URL, or ``None`` when there are no server binaries."""
    bindir = find_bindir()
    if bindir is None:
        return None
    cluster = Cluster(bindir, Path(tempfile.mkdtemp(prefix="qawatch-pg-")))
    atexit.register(cluster.stop)  # should the session end without its fixture teardown
    return cluster, cluster.start()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The URL of a PostgreSQL server for this session (see the module's docstring)."""
    if _OFF:
        pytest.skip(f"{SKIP_REASON} [{SWITCH_ENV}=off]")
    if _ENV_URL is not None:
        with_dbname(_ENV_URL, "postgres")  # a postgresql:// URL, else a clear error
        yield _ENV_URL
        return
    started = start_cluster()
    if started is None:
        pytest.skip(SKIP_REASON)
    cluster, url = started
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture
def make_pg_db(pg_url: str) -> Iterator[Callable[[], str]]:
    """Call it for the URL of one more fresh, empty database; all are dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"qawatch_t_{uuid.uuid4().hex[:16]}"
        create_database(pg_url, name)
        made.append(name)
        return with_dbname(pg_url, name)

    try:
        yield make
    finally:
        for name in made:
            drop_database(pg_url, name)


@pytest.fixture
def pg_db(make_pg_db: Callable[[], str]) -> str:
    """The URL of a fresh, empty database for this test, dropped after it."""
    return make_pg_db()


# --- the command line (.ci/run) -----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A throwaway PostgreSQL cluster, as the tests' pg_url.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bindir", help="print the server binaries' folder; exit 1 when there are none")
    for name, text in (("start", "start a cluster in ROOT, print its URL"), ("stop", "stop it, remove ROOT")):
        commands.add_parser(name, help=text).add_argument("root", type=Path, metavar="ROOT")
    args = parser.parse_args(argv)
    if args.command == "bindir":
        bindir = find_bindir()
        if bindir is None:
            print("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found", file=sys.stderr)
            return 1
        print(bindir)
    elif args.command == "start":
        bindir = find_bindir()
        if bindir is None:
            print(SKIP_REASON.replace("tests skipped", "cluster not started"), file=sys.stderr)
            return 1
        print(Cluster(bindir, args.root).start())
    elif (args.root / _STATE_FILE).exists():
        Cluster.load(args.root).stop()
    else:
        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
