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

from typing import Any

from osa_dagster.defs.dagster_private import (
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


class DataFolderComputeLogs(_InDataFolder, LocalComputeLogManager):
    pass
