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

from typing import Any, Self

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


class DataFolderRunStorage(SqliteRunStorage):
    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> Self:
        return cls.from_local(inst_data=inst_data, **in_data_folder(config_value))


class DataFolderScheduleStorage(SqliteScheduleStorage):
    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Self:
        return cls.from_local(inst_data=inst_data, **in_data_folder(config_value))


class DataFolderArtifactStorage(LocalArtifactStorage):
    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> Self:
        return cls(inst_data=inst_data, **in_data_folder(config_value))


class DataFolderComputeLogs(LocalComputeLogManager):
    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Self:
        return cls(inst_data=inst_data, **in_data_folder(config_value))
