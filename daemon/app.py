"""`qawatch run`: wires settings, store, client, poller and sink workers, and owns shutdown.

Resources are entered in order on one :class:`contextlib.AsyncExitStack` (store, HTTP
session, sinks) and closed in reverse. Shutdown is two-phase: stop scheduling, then let
in-flight polls and deliveries finish within ``shutdown.grace_s``; what is left stays
pending in the store for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from daemon.control import ControlServer
from daemon.detect import DamagedState
from daemon.errors import ConfigError, NotFoundError, RejectedError, UpstreamError
from daemon.leases import LeaseKeeper, SharedStore
from daemon.logs import get_logger
from daemon.memory import release_free_memory
from daemon.metrics import Metrics
from daemon.outbox import SinkWorker
from daemon.qatech import QATechClient
from daemon.scheduler import Pacing
from daemon.sdnotify import Notifier
from daemon.settings import Settings, bad_id_message, is_short_id, mask_url
from daemon.sinks import Sink, build_sinks
from daemon.store import STORE_ERRORS, SqliteStore, Store, StoreRunner, WatchRow
from daemon.watcher import Poller

WATCH_FILE_CHECK_S = 2.0
STATUS_EVERY_S = 5.0
#: freed memory goes back to the OS every this many status beats (5 s: a few ms each time)
TRIM_EVERY_BEATS = 1
PRUNE_EVERY_S = 3600.0
#: watches read from the store per page at start-up
LOAD_PAGE = 1000
#: from this many watches on, start-up keeps the loaded watch set out of the cyclic collector
FREEZE_FROM = 10_000
#: what a failed reload reports: a bad configuration or a failing store
_RELOAD_ERRORS: tuple[type[BaseException], ...] = (ConfigError, *STORE_ERRORS)
_RELEASE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *STORE_ERRORS)


def read_watch_file(path: Path) -> list[str]:
    """Ids from a watch file: one per line, ``#`` starts a comment, blank lines ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error: watch.file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:  # a ValueError, not an OSError: a user error all the same
        raise ConfigError(f"config error: watch.file: {path} is not UTF-8 text") from None
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        if not is_short_id(value):
            raise ConfigError(f"config error: watch.file: {path} line {number}: {bad_id_message(value)}")
        ids.append(value)
    return ids


def replica_id() -> str:
    """This process among the replicas sharing a store: host, pid and a random tag (a
    restarted container has the same host name and often the same pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"[:120]


def open_store(settings: Settings, replica: str | None = None) -> Store:
    """The store the settings name: PostgreSQL with ``state.url`` (shared by replicas), else
    the SQLite file at ``state.path``. Not opened yet."""
    if settings.state.url:
        # psycopg is imported only when it is used (memory and start-up of the SQLite case)
        from daemon.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(settings.state.url, replica or replica_id(), settings.state.lease_ttl_s)
    return SqliteStore(settings.state.path)


def _mtime(path: Path | None) -> float | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime
    except OSError:
        return None


class App:
    """The daemon: ``await App(settings, token).run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        token: str,
        *,
        sinks: Sequence[Sink] | None = None,
        wall: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        settings_loader: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        #: reads the configuration again (same --config and flags) on SIGHUP; None: keep ``settings``
        self.settings_loader = settings_loader
        self.token = token
        self.sinks = list(sinks) if sinks is not None else build_sinks(settings)
        self.wall = wall
        self.poller: Poller | None = None
        self.sink_workers: list[SinkWorker] = []
        self.reload_requested = asyncio.Event()
        self.ready = asyncio.Event()
        self.failed = False
        #: active watches in the store at start-up (loaded a page at a time by load_watches)
        self.watch_total = 0
        #: load_watches moved the watch set out of the collector's sight (gc.freeze)
        self._frozen = False
        #: with a shared store (state.url): this replica's name, and what keeps its leases
        self.replica = replica_id()
        self.leases: LeaseKeeper | None = None
        #: a user-fixable problem found while running (a damaged state file): `run` exits 2 with it
        self.fatal: ConfigError | None = None
        self._watch_file_mtime: float | None = None
        self._stop: asyncio.Event | None = None
        self.metrics = Metrics()
        #: one change to the watch set at a time (reload, control API add and remove)
        self._watch_lock = asyncio.Lock()
        self.notifier = notifier or Notifier.from_env()
        self.control: ControlServer | None = None
        self.runner: StoreRunner | None = None
        self.log = get_logger()

    # -- configuration sources ---------------------------------------------------------

    def configured_ids(self) -> list[str]:
        ids = list(self.settings.watch.ids)
        if self.settings.watch.file is not None:
            ids += read_watch_file(self.settings.watch.file)
        return list(dict.fromkeys(ids))

    async def sync_config(self, poller: Poller, runner: StoreRunner, *, initial: bool = False) -> None:
        """Make the configured ids the config-sourced watch set; start and end watches.
        ``initial``: leave the active watches to :meth:`load_watches` (start-up)."""
        self._watch_file_mtime = _mtime(self.settings.watch.file)
        ids = self.configured_ids()
        store = runner.store
        orphans = await runner.run(store.sync_config_watches, ids, self.settings.watch.backfill, self.wall())
        for row in orphans:
            await poller.end_watch(row.short_id, "removed", row.started_at)
        # initial: load_watches does it; a shared store: the lease keeper claims new ones
        if not initial and not isinstance(store, SharedStore):
            poller.start_watches(await runner.run(store.watches, active_only=True))
        configured = set(ids)
        for row in await runner.run(store.watches, ended_only=True):
            if row.short_id in configured:
                self.log.info("configured watch stays ended", conversation=row.short_id, reason=row.reason)

    def _reloaded_settings(self) -> Settings | None:
        """The running settings with the ``watch`` section as the configuration says now; None
        (logged) when the configuration cannot be loaded. Other sections take effect at a restart."""
        if self.settings_loader is None:
            return self.settings
        try:
            fresh = self.settings_loader()
        except ConfigError as exc:
            self.log.error(
                "reload: the configuration is not valid; keeping the current watch set", error=str(exc)
            )
            return None
        stale = [
            name
            for name in type(fresh).model_fields
            if name != "watch" and getattr(fresh, name) != getattr(self.settings, name)
        ]
        if stale:
            self.log.warning(
                "reload: these sections changed and take effect only at a restart", sections=stale
            )
        return self.settings.model_copy(update={"watch": fresh.watch})

    async def reload(self, *, reread_config: bool = True) -> None:
        """SIGHUP: apply the configuration's ``watch`` section (ids, file, backfill,
        expire_after_s), re-read the watch file and reopen file sinks (logrotate).

        ``reread_config=False`` (the watch file changed) re-reads only the watch file."""
        if self.poller is None:
            return
        self.log.info("reloading")
        self.notifier.reloading()
        current = self.settings
        candidate = self._reloaded_settings() if reread_config else current
        if candidate is None:
            self._watch_file_mtime = _mtime(current.watch.file)  # no retry every few seconds
        else:
            self.settings = candidate
            try:
                async with self._watch_lock:
                    await self.sync_config(self.poller, self.poller.runner)
                self.poller.expire_after_s = candidate.watch.expire_after_s
            except _RELOAD_ERRORS as exc:
                self.settings = current
                self._watch_file_mtime = _mtime(current.watch.file)
                self.log.error("reload failed; keeping the current watch set", error=str(exc))
        for sink in self.sinks:
            try:
                await sink.reopen()
            except Exception as exc:  # noqa: BLE001 - one sink's reopen failure must not stop the daemon
                self.log.error("sink reopen failed", sink=sink.name, error=str(exc))
        self.notifier.ready(self.status_line())

    def request_reload(self) -> None:
        self.reload_requested.set()

    # -- run -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            if self._frozen:  # embedded (tests, demo): let what this daemon held be collected
                gc.unfreeze()
                self._frozen = False
        if self.fatal is not None:
            raise self.fatal

    async def _run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        async with contextlib.AsyncExitStack() as stack:
            runner = StoreRunner(open_store(settings, self.replica))
            await runner.open()
            stack.push_async_callback(runner.close)
            self.runner = runner
            client = QATechClient(
                settings.api.base_url,
                self.token,
                timeout_s=settings.api.timeout_s,
                max_connections=settings.api.max_concurrency,
                max_response_bytes=settings.api.max_response_bytes,
            )
            await client.open()
            stack.push_async_callback(client.close)
            for sink in self.sinks:
                await sink.open()
                stack.push_async_callback(sink.close)

            self.sink_workers = [
                SinkWorker(sink, runner, wall=self.wall, metrics=self.metrics) for sink in self.sinks
            ]
            poller = Poller(
                client,
                runner,
                self.sinks,
                pacing=Pacing(**settings.poll.model_dump()),
                max_concurrency=settings.api.max_concurrency,
                rate_limit_per_s=settings.api.rate_limit_per_s,
                message_limit=settings.api.message_limit,
                expire_after_s=settings.watch.expire_after_s,
                wall=self.wall,
                on_events=self._wake_sinks,
                metrics=self.metrics,
                on_damaged=self._on_damaged_state,
            )
            self.poller = poller
            await self._warn_of_orphaned_queues(runner)
            await self.sync_config(poller, runner, initial=True)
            self.watch_total = (await runner.run(runner.store.watch_counts)).get("active", 0)
            if settings.control.listen is not None:
                token = settings.control.token.get_secret_value() if settings.control.token else None
                self.control = ControlServer(self, settings.control.listen, token)
                await self.control.start()  # a port still held (the previous instance): exit 1
                stack.push_async_callback(self.control.stop)
            await self._serve(poller, stop)

    async def load_watches(self, poller: Poller, runner: StoreRunner) -> None:
        """Start-up: schedule the stored active watches a page at a time while polling has
        begun (100,000 take about a second; the first poll does not wait for the last page),
        then read every detector state once to find a damaged one now rather than later."""
        # a big watch set lives as long as the daemon: keep the cyclic collector from walking
        # it again and again while it grows (each full pass over 100,000 watches stalls the
        # loop for tens of milliseconds), and from walking it later (gc.freeze; undone when
        # the daemon stops, see :meth:`run`); a host that turned the collector off keeps it off
        freeze = self.watch_total >= FREEZE_FROM and gc.isenabled()
        if freeze:
            gc.disable()
            # what start-up holds (modules, settings) first: the collection after loading then
            # walks only what loading made (10,000 watches: about 4 ms instead of 50 ms, a
            # stall long enough to bunch requests at the rate limit). Collected before, while
            # nothing is polled yet: start-up's cyclic garbage is not made permanent.
            gc.collect()
            gc.freeze()
        try:
            after, placed, began = 0, 0, poller.now()
            while True:
                rows, after = await runner.run(runner.store.active_watches_page, after, LOAD_PAGE)
                if not rows:
                    break
                total = max(self.watch_total, placed + len(rows))
                poller.start_watches(rows, place=(placed, total, began))
                placed += len(rows)
                # parse this page's states now: the JSON is freed before the next page comes in
                await poller.check_states(row.short_id for row in rows)
        finally:
            if freeze:
                gc.collect()  # what loading left as cyclic garbage is not made permanent
                gc.freeze()
                gc.enable()
                self._frozen = True
        self.log.debug("watch set loaded", watches=len(poller.watches))
        await release_free_memory()  # the pages and their JSON are gone: give that memory back

    def _on_damaged_state(self, short_id: str, exc: DamagedState) -> None:
        """A flipped byte that PRAGMA quick_check cannot see: stop, and exit 2 naming the file."""
        if self.fatal is None:
            self.fatal = ConfigError(
                f"config error: state.path: {self.settings.state.path} is damaged: {exc} (watch {short_id})"
            )
            self.log.error(str(self.fatal))
        if self._stop is not None:
            self._stop.set()

    def _wake_sinks(self) -> None:
        for worker in self.sink_workers:
            worker.wake.set()

    def _reap(self, task: asyncio.Task[None]) -> None:
        """Never let a background task's exception vanish: log it and stop the daemon."""
        if task.cancelled() or task.exception() is None:
            return
        self.failed = True
        self.log.error("internal error; stopping", task=task.get_name(), error=repr(task.exception()))
        if self._stop is not None:
            self._stop.set()

    async def _serve(self, poller: Poller, stop: asyncio.Event) -> None:
        self._stop = stop
        sink_tasks = [asyncio.create_task(w.run(), name=f"sink:{w.sink.name}") for w in self.sink_workers]
        poll_tasks = [asyncio.create_task(poller.schedule_loop(), name="scheduler")]
        poll_tasks += [
            asyncio.create_task(poller.worker(), name=f"poll-worker-{i}")
            for i in range(poller.max_concurrency)
        ]
        store = poller.runner.store
        if isinstance(store, SharedStore):
            self.leases = LeaseKeeper(store, poller.runner, poller, self.metrics)
            loader = asyncio.create_task(self.leases.run(), name="leases")
        else:
            loader = asyncio.create_task(self.load_watches(poller, poller.runner), name="load-watches")
        for task in [*sink_tasks, *poll_tasks, loader]:
            task.add_done_callback(self._reap)
        self.log.info(
            "qawatch running",
            watches=self.watch_total,
            sinks=[s.name for s in self.sinks],
            base_url=mask_url(self.settings.api.base_url),
        )
        self.ready.set()
        self.notifier.ready(self.status_line())
        extra = [
            asyncio.create_task(self._report_status(), name="status"),
            asyncio.create_task(self._prune_periodically(), name="prune"),
            asyncio.create_task(poller.writer.run_flusher(), name="flusher"),
            loader,
        ]
        if self.notifier.watchdog_interval_s is not None:
            extra.append(asyncio.create_task(self.notifier.run_watchdog(self._healthy), name="watchdog"))
        try:
            await self._until_stopped(stop)
        finally:
            self.notifier.stopping()
            for task in extra:
                task.cancel()
            await asyncio.gather(*extra, return_exceptions=True)
            await self._shutdown(poller, poll_tasks, sink_tasks)

    # -- status, readiness, runtime watches (control API) ------------------------------

    def _healthy(self) -> bool:
        """For the systemd watchdog: the scheduler loop is alive."""
        return not self.failed

    def status_line(self) -> str:
        poller = self.poller
        if poller is None:
            return "starting"
        pending = sum(1 for w in poller.watches.values() if w.pending)
        parts = [f"{len(poller.watches)} watched", f"{pending} pending"]
        if poller.token_refused:
            parts.append("token refused")
        disabled = [w.sink.name for w in self.sink_workers if w.disabled]
        if disabled:
            parts.append("disabled sinks: " + ",".join(disabled))
        return ", ".join(parts)

    async def _report_status(self) -> None:
        """systemd's STATUS= line when it changes; freed memory back to the OS."""
        last = ""
        for beat in itertools.count(1):
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            await asyncio.sleep(STATUS_EVERY_S)
            if beat % TRIM_EVERY_BEATS == 0:
                await release_free_memory()

    async def prune(self) -> None:
        """Forget delivered event texts older than ``state.retention_days`` (ids stay)."""
        days = self.settings.state.retention_days
        if days is None or self.runner is None:
            return
        cutoff = self.wall() - days * 86400
        deliveries, events = await self.runner.run(self.runner.store.prune, cutoff)
        if deliveries or events:
            self.log.info("pruned old deliveries", deliveries=deliveries, event_texts=events, days=days)

    async def _prune_periodically(self) -> None:
        while True:
            try:
                await self.prune()
            except STORE_ERRORS as exc:  # the poller reports a failing store; try again later
                self.log.warning("pruning the state store failed", error=str(exc))
            await asyncio.sleep(PRUNE_EVERY_S)

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.runner is None or not self.ready.is_set():
            problems.append("not started")
        if self.poller is not None and self.poller.token_refused:
            problems.append("the API refuses the token")
        problems += [f"sink {w.sink.name} is disabled (410)" for w in self.sink_workers if w.disabled]
        problems += [
            f"sink {w.sink.name} is failing: {w.last_error}"
            for w in self.sink_workers
            if w.failing and not w.sink.remote
        ]
        if self.poller is not None and self.poller.store_failing:
            problems.append("the state store cannot be written")
        if self.failed:
            problems.append("internal error")
        return problems

    async def _warn_of_orphaned_queues(self, runner: StoreRunner) -> None:
        """Pending events of a sink no longer configured (renamed, removed, or its default name
        changed when a second sink of its type came) would wait forever: say so, once."""
        names = {sink.name for sink in self.sinks}
        counts = await runner.run(runner.store.delivery_counts)
        for (sink, state), pending in sorted(counts.items()):
            if state == "pending" and sink not in names and pending:
                self.log.warning(
                    "events wait for a sink that is not configured; name a sink so to deliver them",
                    sink=sink,
                    pending=pending,
                    configured=sorted(names),
                )

    async def refresh_gauges(self) -> None:
        """Set the gauges that are read from state rather than counted as things happen."""
        if self.runner is None:
            return
        by_state = await self.runner.run(self.runner.store.watch_counts)
        for state in ("active", "ended"):
            self.metrics.watches.labels(state).set(by_state.get(state, 0))
        counts = await self.runner.run(self.runner.store.delivery_counts)
        for sink in self.sinks:
            self.metrics.outbox_pending.labels(sink.name).set(counts.get((sink.name, "pending"), 0))

    def _started(self) -> tuple[StoreRunner, Poller]:
        if self.runner is None or self.poller is None:
            raise RuntimeError("the daemon has not started")
        return self.runner, self.poller

    async def watch_rows(self) -> list[WatchRow]:
        runner, poller = self._started()
        await poller.writer.flush()  # the latest poll times, not those of the last flush
        return await runner.run(runner.store.watches)

    async def watch_row(self, short_id: str) -> WatchRow | None:
        runner, poller = self._started()
        await poller.writer.flush()
        return await runner.run(runner.store.get_watch, short_id)

    async def add_watch(self, short_id: str, backfill: str) -> tuple[WatchRow, bool]:
        """Watch ``short_id`` from the runtime source; (row, whether it was not watched before)."""
        runner, poller = self._started()
        async with self._watch_lock:
            before = await self.watch_row(short_id)
            row = await runner.run(runner.store.add_runtime_watch, short_id, backfill, self.wall())
            if row.holder in (None, self.replica):  # shared: polled here only with its lease
                poller.start_watches([row], spread=False)
        self.log.info("watch added", conversation=short_id, backfill=row.backfill)
        return row, before is None or not before.active

    async def check_conversation(self, short_id: str) -> None:
        """One read of ``short_id`` (paced like a poll), so that adding a watch on an id the API
        does not know fails at once: :class:`NotFoundError` or :class:`RejectedError`. Any other
        trouble (the API down, a 429) is no reason to refuse the watch: polling will tell."""
        _, poller = self._started()
        await poller.take_turn()
        try:
            await poller.client.get_conversation(short_id, 1)
        except (NotFoundError, RejectedError):
            raise
        except UpstreamError as exc:
            self.log.info(
                "could not check the conversation; watching it anyway", conversation=short_id, error=str(exc)
            )

    async def remove_watch(self, short_id: str) -> WatchRow:
        """Drop the runtime source; a watch with no source left ends as ``removed``."""
        runner, poller = self._started()
        async with self._watch_lock:
            row = await runner.run(runner.store.remove_runtime_watch, short_id)
            if row is None:
                raise KeyError(short_id)
            if not row.in_config and row.active:
                await poller.end_watch(short_id, "removed", row.started_at)
        self.log.info("watch removed", conversation=short_id)
        return await self.watch_row(short_id) or row

    async def _until_stopped(self, stop: asyncio.Event) -> None:
        stop_wait = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                reload_wait = asyncio.create_task(self.reload_requested.wait())
                await asyncio.wait(
                    {stop_wait, reload_wait},
                    timeout=WATCH_FILE_CHECK_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                reload_wait.cancel()
                changed = _mtime(self.settings.watch.file) != self._watch_file_mtime
                if stop.is_set():
                    break
                if self.reload_requested.is_set() or (self.settings.watch.file and changed):
                    signalled = self.reload_requested.is_set()
                    self.reload_requested.clear()
                    await self.reload(reread_config=signalled)
        finally:
            stop_wait.cancel()

    async def _shutdown(
        self,
        poller: Poller,
        poll_tasks: list[asyncio.Task[None]],
        sink_tasks: list[asyncio.Task[None]],
    ) -> None:
        grace = self.settings.shutdown.grace_s
        deadline = asyncio.get_running_loop().time() + grace
        self.log.info("shutting down", grace_s=grace, in_flight=len(poller.in_flight))
        poller.stop()
        # finish the polls already in flight (their results are saved), then stop workers
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(poller.queue.join(), grace)
        for task in poll_tasks:
            task.cancel()
        await asyncio.gather(*poll_tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()

        def remaining() -> float:  # at least a second for each step, even past the grace
            return max(1.0, deadline - loop.time())

        try:  # the commits under way, and the poll times not yet written
            await asyncio.wait_for(poller.writer.close(), remaining())
        except TimeoutError:
            poller.writer.abort()
            self.log.warning(
                "the state store did not answer at shutdown: the latest poll times are not saved"
            )
        for worker in self.sink_workers:
            worker.stop()
        if sink_tasks:
            _, late = await asyncio.wait(sink_tasks, timeout=remaining())
            for task in late:
                task.cancel()
            await asyncio.gather(*sink_tasks, return_exceptions=True)
        store = poller.runner.store
        if isinstance(store, SharedStore):
            # now that nothing is sent any more: the other replicas take this one's watches and
            # unsent deliveries at once, not after the TTL
            try:
                await asyncio.wait_for(poller.runner.run(store.release_all), remaining())
            except _RELEASE_ERRORS as exc:
                self.log.warning(
                    "could not release leases; they lapse after state.lease_ttl_s",
                    error=str(exc)[:200] or type(exc).__name__,
                )
                store.close()  # thread-safe: ends the store thread's wait for a connection now
        self.log.info("stopped")
