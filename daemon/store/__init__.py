"""Durable state: the watch set, each watch's detector state, and the event outbox.

* :mod:`daemon.store.base`: what does not depend on the database: the :class:`Store`
  protocol, the rows it returns (:class:`WatchRow`, :class:`Delivery`, :class:`DeadLetter`),
  what a poll saves (:class:`PollRecord`), :class:`StoreRunner` (runs a store's synchronous
  calls on one worker thread) and :data:`STORE_ERRORS` (what a failing database raises).
* :mod:`daemon.store.sqlite`: :class:`SqliteStore`, the default store (SQLite in WAL mode).
* :mod:`daemon.store.postgres`: :class:`~daemon.store.postgres.PostgresStore`, one database
  shared by several replicas, with leases (imported only when ``state.url`` is set).

The names are re-exported here: import them from :mod:`daemon.store`.
"""

from daemon.store.base import (
    STORE_ERRORS,
    DeadLetter,
    Delivery,
    PollRecord,
    Store,
    StoreError,
    StoreRunner,
    WatchRow,
)
from daemon.store.sqlite import SCHEMA_VERSION, SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "STORE_ERRORS",
    "DeadLetter",
    "Delivery",
    "PollRecord",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreRunner",
    "WatchRow",
]
