"""The embedded instance's storages, kept in the data folder whichever folder Dagster runs in.

Dagster's own SQLite and local-file storages take a `base_dir` that, when relative, is
relative to the working folder: a `dagster` command started elsewhere than the one before
would read and write a second, empty instance there. These storages are Dagster's, with a
relative `base_dir` taken relative to the project's data folder (`OSA_DATA_DIR`, else
`$DAGSTER_HOME/.data`, else `.data`: settings.data_dir), read when each process loads the
instance, so the CLI, the webserver, the daemon, run workers, `dagster` and `dg` commands
share it from any folder. An absolute `base_dir` is used as it is.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from osa_dagster.defs.dagster_private import (
    CapturedLogContext,
    ConfigurableClassData,
    LocalArtifactStorage,
    LocalComputeLogManager,
    SqliteRunStorage,
    SqliteScheduleStorage,
)
from osa_dagster.settings import data_dir


def in_data_folder(config_value: dict[str, Any]) -> dict[str, Any]:
    """`config_value` with its `base_dir` resolved against the data folder."""
    return {**config_value, "base_dir": str(data_dir() / config_value["base_dir"])}


class _InDataFolder:
    """Resolves `base_dir` before the Dagster storage it is mixed into reads its config.
    (Those build their own class, not the subclass: the storage behaves the same, and its
    inst_data, which other processes rebuild it from, names the subclass.)"""

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Any:
        return super().from_config_value(inst_data, in_data_folder(config_value))  # type: ignore[misc]


class DataFolderRunStorage(_InDataFolder, SqliteRunStorage):
    pass


class DataFolderScheduleStorage(_InDataFolder, SqliteScheduleStorage):
    pass


class DataFolderArtifactStorage(_InDataFolder, LocalArtifactStorage):
    pass


class HelpersSpareCtrlC:
    """Mixed into a compute log manager: its helper processes do not die of a Ctrl-C.

    While a step runs, Dagster mirrors its output to the console through a `tail` process
    and a Python process that watches it, both in the command's process group: a Ctrl-C
    killed them, printing the watcher's traceback and cutting the console's copy of the
    step's last lines. They start with SIGINT blocked, so that the command alone handles
    it; they still end with the step (SIGTERM), or with the command's process."""

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Iterator[CapturedLogContext]:
        with ExitStack() as captured:
            with _sigint_blocked():
                context = captured.enter_context(super().capture_logs(log_key))  # type: ignore[misc]
            yield context


class DataFolderComputeLogs(_InDataFolder, HelpersSpareCtrlC, LocalComputeLogManager):
    """Dagster's local compute logs, in the data folder; this class, not Dagster's, is
    built, so that its helpers spare a Ctrl-C."""

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Any:
        return cls(inst_data=inst_data, **in_data_folder(config_value))


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT held back from this thread, and from the processes it starts meanwhile; one
    that arrives meanwhile is delivered when the block ends, not lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
