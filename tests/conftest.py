"""Shared fixtures. Every test gets its own data folder, so no test sees another's records."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.local_postgres import PgCluster, pg_binary, throwaway_postgres
from tests.fixtures.services import unavailable

# Each test's hook attempts share the slots and budget of its own data folder.
HOOK_CAPACITY = ("OSA_HOOK_SLOTS", "OSA_HOOK_MEMORY_BUDGET", "OSA_HOOK_LEDGER")


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "data"
    monkeypatch.setenv("OSA_DATA_DIR", str(data))
    for name in (
        "OSA_STORAGE",
        "OSA_DATABASE_URL",
        "OSA_HOOK_MEMORY",
        "OSA_CONVENTIONS",
        *HOOK_CAPACITY,
    ):
        monkeypatch.delenv(name, raising=False)
    return data


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_conventions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Load the toy conventions the way a user loads their own: by module name, with the
    module's folder on PYTHONPATH (which hook processes inherit)."""
    monkeypatch.setenv("OSA_CONVENTIONS", "tests.fixtures.toy_convention")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    yield


@pytest.fixture
def postgres() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL server; on CI a missing server fails the test."""
    if pg_binary("initdb") is None:
        unavailable("PostgreSQL (initdb, pg_ctl) is not installed")
    with throwaway_postgres() as server:
        yield server


def use_instance_profile(
    profile: Path, postgres: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """DAGSTER_HOME with `profile` as its dagster.yaml and the OSA_DAGSTER_PG_* variables
    the shipped profiles read, pointing at `postgres`; the home folder."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(profile, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "OSA_DAGSTER_PG_HOST": "127.0.0.1",
        "OSA_DAGSTER_PG_PORT": str(postgres.port),
        "OSA_DAGSTER_PG_DB": "postgres",
        "OSA_DAGSTER_PG_USER": "postgres",
        "OSA_DAGSTER_PG_PASSWORD": "",
    }.items():
        monkeypatch.setenv(name, value)
    return home
