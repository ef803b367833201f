"""The embedded instance's event log: Dagster's SQLite storage, with its connections kept open.

Dagster's SQLite event log opens a new connection for every write and closes it after: in
WAL mode, closing the last connection to a database checkpoints the log into it and
deletes the log, two more syncs to disk. An ingest writes a dozen events per batch
(materialisations planned and done, check evaluations), each into the run's database and
the shared index: at about 15-40 ms an event, that was most of what Dagster cost per batch
(bench/orchestration_overhead.py). This storage keeps one open connection per database, for
the run databases recently used and the index, so a write costs its statements and one
commit. It stores the same tables in the same files, so an instance can switch to it and
back.

What changes besides speed:
- New rows reach a run's database file only when SQLite checkpoints (every 1,000 pages, or
  when the last connection closes); until then they are in its `-wal` file. Readers in every
  process see them either way, but Dagster's live view of a run (the UI's run page) watches
  the database file for changes, so this storage also watches the `-wal` file.
- SQLite connections must not be used across a fork: a forked child opens its own, and
  leaves the copies it inherited alone (never closed there, where closing would run
  SQLite's clean-up on files the parent still uses).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from osa_dagster.defs.dagster_private import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    ConfigurableClassData,
    EventHandlerFn,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from osa_dagster.defs.instance_storage import in_data_folder

# Run databases kept open besides the index: a run writes to its own, the webserver reads
# those of the runs it shows. The least recently used is closed when one more opens.
OPEN_RUN_DATABASES = 16

# Connections a forked child inherited: kept referenced so that they are never closed there.
_INHERITED: list[Engine] = []


class _LogWatchdog(SqliteEventLogStorageWatchdog):
    """Dagster's watch of a run's events, woken by writes to the database's WAL as well."""

    def __init__(
        self,
        storage: SqliteEventLogStorage,
        run_id: str,
        callback: EventHandlerFn,
        cursor: str | None,
    ) -> None:
        super().__init__(storage, run_id, callback, cursor)
        self._watched = [self._log_path, f"{self._log_path}-wal"]

    @property
    def patterns(self) -> list[str]:
        return self._watched

    def on_modified(self, event: Any) -> None:
        self._process_log()


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage whose databases stay open between writes (see the module doc).

    In dagster.yaml, beside the SQLite run and schedule storages:

        event_log_storage:
          module: osa_dagster.defs.event_log
          class: PooledSqliteEventLogStorage
          config:
            base_dir: dagster/storage/history/runs/

    A relative `base_dir` is in the data folder, as with the other storages of
    defs/instance_storage.py.
    """

    # The observer the first watch starts: Dagster sets None in its __init__, which is all
    # a checker infers of it.
    _obs: BaseObserver | None  # type: ignore[assignment]

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_pid = os.getpid()
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PooledSqliteEventLogStorage:
        return cls(inst_data=inst_data, **in_data_folder(config_value))

    def _engine(self, shard: str) -> Engine:
        """The open engine of `shard`; called under Dagster's lock, which every use holds."""
        if os.getpid() != self._engines_pid:
            _INHERITED.extend(self._engines.values())
            self._engines = OrderedDict()
            self._engines_pid = os.getpid()
        engine = self._engines.pop(shard, None)
        if engine is None:
            engine = create_engine(
                self.conn_string_for_shard(shard),
                # One connection, used by one thread at a time under Dagster's lock.
                poolclass=StaticPool,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
        self._engines[shard] = engine
        run_databases = [name for name in self._engines if name != INDEX_SHARD_NAME]
        for name in run_databases[:-OPEN_RUN_DATABASES]:
            self._engines.pop(name).dispose()
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as connection, connection.begin():
                yield connection

    def _close_all(self) -> None:
        with self._db_lock:
            engines, self._engines = self._engines, OrderedDict()
            if os.getpid() == self._engines_pid:
                for engine in engines.values():
                    engine.dispose()

    def wipe(self) -> None:
        # It deletes the run databases: no connection may keep their files alive.
        self._close_all()
        super().wipe()

    def watch(self, run_id: str, cursor: str | None, callback: EventHandlerFn) -> None:
        if self._obs is None:
            self._obs = Observer()
            self._obs.start()
        watchdog = _LogWatchdog(self, run_id, callback, cursor)
        self._watchers[run_id][callback] = (
            watchdog,
            self._obs.schedule(watchdog, self._base_dir, recursive=True),
        )

    def dispose(self) -> None:
        super().dispose()
        self._close_all()
