"""The resources and asset kinds the UI shows: what the settings configure, secrets redacted."""

from __future__ import annotations

import dagster as dg
import pytest

from osa_dagster.definitions import build_definitions
from osa_dagster.defs.resources import Resources
from osa_dagster.settings import Settings


def kinds_of(defs: dg.Definitions, *path: str) -> set[str]:
    key = dg.AssetKey(list(path))
    return set(defs.resolve_assets_def(key).specs_by_key[key].kinds)


def test_resources_show_the_store_the_database_and_the_runner(isolated_data_dir) -> None:
    resources = Resources.of(Settings.from_env())
    assert resources.artifact_store.location == str(isolated_data_dir / "artifacts")
    assert resources.records_db.url == f"sqlite:///{isolated_data_dir / 'records.db'}"
    assert resources.hook_runner.kind == "local"
    defs = build_definitions()
    assert kinds_of(defs, "pdb", "published_records") == {"sqlite"}
    assert kinds_of(defs, "pdb", "features") == {"sqlite"}
    assert kinds_of(defs, "pdb", "raw_batch") == {"python"}
    assert kinds_of(defs, "pdb", "hook_outcomes", "validate_structure") == {"python"}
    # Nothing was created to show them.
    assert not isolated_data_dir.exists()


def test_a_postgres_database_on_s3_with_docker_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSA_DATABASE_URL", "postgresql+psycopg2://osa@db.example:5432/records")
    monkeypatch.setenv("OSA_DATABASE_PASSWORD", "s3cret")
    monkeypatch.setenv("OSA_STORAGE", "s3://archive/osa")
    monkeypatch.setenv("OSA_HOOK_RUNNER", "docker")
    resources = Resources.of(Settings.from_env())
    # The URL is shown whole, the password by its variable's name.
    assert resources.records_db.url == "postgresql+psycopg2://osa@db.example:5432/records"
    assert resources.records_db.password == dg.EnvVar("OSA_DATABASE_PASSWORD")
    assert isinstance(resources.records_db.password, dg.EnvVar)
    assert resources.artifact_store.location == "s3://archive/osa"
    assert resources.hook_runner.kind == "docker"
    defs = build_definitions()
    assert kinds_of(defs, "pdb", "published_records") == {"postgres"}
    assert kinds_of(defs, "pdb", "raw_batch") == {"python", "s3"}
    assert kinds_of(defs, "pdb", "hook_outcomes", "extract_features") == {"docker", "s3"}


def test_a_url_holding_its_password_is_shown_by_name_only(monkeypatch) -> None:
    monkeypatch.setenv("OSA_DATABASE_URL", "postgresql://osa:s3cret@db.example/records")
    db = Resources.of(Settings.from_env()).records_db
    assert isinstance(db.url, dg.EnvVar) and db.url == dg.EnvVar("OSA_DATABASE_URL")
