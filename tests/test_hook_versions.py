"""A stricter validator deployed over the ingested PDB mirror, then taken back.

The bundled mirror is ingested as convention pdb_versioned (tests/fixtures/
versioned_pdb_convention.py). Then validate_structure gets a stricter version: Dagster
reports exactly its hook_outcomes partitions as changed code, `osa versions` lists the
batches it has not judged, and the dry run predicts which records re-validation withdraws.
Re-validation withdraws exactly those (SRN kept, reason and time recorded), runs only the
changed hook, and leaves the others untouched; every published record's provenance names
the hook versions and the digests of its files. The old validator back, the dry run
predicts the reinstatements, and materialising reinstates them without running any hook.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import gemmi
import pytest
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleCauseCategory,
    StaleStatus,
)
from dagster._core.loader import LoadingContextForTest
from sqlalchemy import select

from osa_dagster.batch.revalidate import hook_judgements, revalidation_dry_run
from osa_dagster.cli import main
from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.resources import Resources
from osa_dagster.engine.spec import hook_version
from osa_dagster.records import Record, RecordsDatabase, database_url
from osa_dagster.records.queries import count_published
from osa_dagster.settings import Settings
from osa_dagster.storage import BatchLayout, artifact_store
from tests.fixtures import versioned_pdb_convention
from tests.fixtures.versioned_pdb_convention import MIN_POLYMER_RESIDUES, VALIDATOR_ENV

MIRROR = Path(__file__).resolve().parents[1] / "osa_dagster/conventions/pdb/mirror"
REPO = Path(__file__).resolve().parents[1]
NAME = "pdb_versioned"
BATCH_SIZE = 10
VALIDATE = dg.AssetKey([NAME, "hook_outcomes", "validate_structure"])
FEATURES = dg.AssetKey([NAME, "hook_outcomes", "extract_features"])


def polymer_residues(path: Path) -> int | None:
    """Polymer residues of the first model, as gemmi counts them; None: not publishable."""
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError):
        return None
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        return None
    structure.setup_entities()
    spans = [chain.get_polymer() for chain in structure[0]]
    residues = sum(len(span) for span in spans)
    return residues or None


def load(validator: str | None, monkeypatch: pytest.MonkeyPatch) -> dg.Definitions:
    """The definitions with the validator version asked for (None: the bundled one)."""
    if validator is None:
        monkeypatch.delenv(VALIDATOR_ENV, raising=False)
    else:
        monkeypatch.setenv(VALIDATOR_ENV, validator)
    importlib.reload(versioned_pdb_convention)
    return build_definitions()


def stale_status(
    instance: dg.DagsterInstance, defs: dg.Definitions, key: dg.AssetKey, partitions: list[str]
) -> dict[str, tuple[StaleStatus, set[StaleCauseCategory]]]:
    """What the UI shows of each partition of the asset: its stale status and why."""
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    return {
        p: (
            resolver.get_status(key, p),
            {cause.category for cause in resolver.get_stale_causes(key, p)},
        )
        for p in partitions
    }


def records(db: RecordsDatabase) -> dict[str, Record]:
    with db.session() as session:
        rows = session.scalars(select(Record).where(Record.convention == NAME)).all()
        session.expunge_all()
        return {row.source_id: row for row in rows}


def attempts_of(convention_name: str, hook: str, partitions: list[str]) -> dict[str, int]:
    """How many attempts the hook's current version made on each batch, from the store."""
    from osa_dagster.batch.views import HookOutcomes

    convention = load_conventions(Settings.from_env())[convention_name]
    store = artifact_store(Settings.from_env())
    version = hook_version(convention.hook(hook))
    return {
        p: len(HookOutcomes(store, BatchLayout(NAME, p), hook, version).checkpoint().attempts)
        for p in partitions
    }


def dry_run(partitions: list[str]) -> dict[str, Any]:
    settings = Settings.from_env()
    convention = load_conventions(settings)[NAME]
    runner = Resources.of(settings).hook_runner
    report = revalidation_dry_run(
        convention,
        artifact_store(settings),
        RecordsDatabase(database_url(settings)),
        runner.get(),
        partitions,
        capacity=runner.capacity(),
        max_examples=100,
    )
    return report.as_json()["changes"]


def ids_of(change: dict[str, Any]) -> set[str]:
    return {example["source_id"] for example in change["examples"]}


@pytest.fixture
def ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    monkeypatch.setenv("OSA_CONVENTIONS", "tests.fixtures.versioned_pdb_convention")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # hook processes import the fixture's hook
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        defs = load(None, monkeypatch)
        planned = defs.resolve_job_def(f"{NAME}_plan").execute_in_process(
            run_config={"ops": {f"{NAME}_plan_batches": {"config": {"batch_size": BATCH_SIZE}}}},
            instance=instance,
        )
        assert planned.success
        partitions = list(instance.get_dynamic_partitions(f"{NAME}_batches"))
        job = defs.resolve_job_def(f"{NAME}_ingest")
        for key in partitions:
            assert job.execute_in_process(partition_key=key, instance=instance).success
        yield instance, partitions, RecordsDatabase(database_url(Settings.from_env()))


def materialise(defs: dg.Definitions, instance: dg.DagsterInstance, partitions: list[str]):
    job = defs.resolve_job_def(f"{NAME}_ingest")
    for key in partitions:
        assert job.execute_in_process(partition_key=key, instance=instance).success


def test_a_stricter_validator_withdraws_exactly_what_it_rejects_and_its_removal_reinstates(
    ingested, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    instance, partitions, db = ingested
    residues = {pdb_id: polymer_residues(path) for pdb_id, path in mirror_entries(MIRROR)}
    publishable = {i for i, n in residues.items() if n is not None}
    too_small = {i for i in publishable if residues[i] < MIN_POLYMER_RESIDUES}  # type: ignore[operator]
    assert len(too_small) >= 5 and len(publishable - too_small) >= 20
    before = records(db)
    assert set(before) == publishable
    assert all(r.status == "published" for r in before.values())
    old_version = hook_version(
        load_conventions(Settings.from_env())[NAME].hook("validate_structure")
    )
    features_attempts = attempts_of(NAME, "extract_features", partitions)
    validate_attempts = attempts_of(NAME, "validate_structure", partitions)

    # A stricter validator is deployed.
    strict = load("strict", monkeypatch)
    convention = load_conventions(Settings.from_env())[NAME]
    new_version = hook_version(convention.hook("validate_structure"))
    assert new_version != old_version
    # The UI: every batch's validate_structure has changed code; extract_features has not.
    assert stale_status(instance, strict, VALIDATE, partitions) == {
        p: (StaleStatus.STALE, {StaleCauseCategory.CODE}) for p in partitions
    }
    assert {s for s, _ in stale_status(instance, strict, FEATURES, partitions).values()} == {
        StaleStatus.FRESH
    }
    # The CLI: the batches the new version has not judged, and by which version they were.
    store = artifact_store(Settings.from_env())
    validate, features = hook_judgements(convention, store, partitions)
    assert validate.version == new_version and validate.judged == []
    assert validate.not_judged == {p: [old_version] for p in partitions}
    assert features.judged == partitions and features.not_judged == {}
    assert main(["versions", NAME]) == 0
    shown = capsys.readouterr().out
    assert f"validate_structure {new_version}: judged 0 of {len(partitions)}" in shown
    assert all(f"{p}  judged by {old_version}" in shown for p in partitions)

    # The sensor an operator may turn on requests runs of exactly those batches.
    sensor = strict.resolve_sensor_def(f"{NAME}_stale_batches")
    resources = {"artifact_store": Resources.of(Settings.from_env()).artifact_store}
    requested = sensor(
        dg.build_sensor_context(instance=instance, definitions=strict, resources=resources)
    )
    assert isinstance(requested, dg.SensorResult) and requested.run_requests
    assert all(
        r.run_key and r.run_key.startswith("revalidate:") and new_version in r.run_key
        for r in requested.run_requests
    )

    # The dry run predicts the withdrawals, and changes no record.
    predicted = dry_run(partitions)
    assert predicted["withdraw"]["count"] == len(too_small)
    assert ids_of(predicted["withdraw"]) == too_small
    assert all(new_version in e["detail"] for e in predicted["withdraw"]["examples"])
    assert {kind: predicted[kind]["count"] for kind in ("add", "revise", "reinstate")} == {
        "add": 0,
        "revise": 0,
        "reinstate": 0,
    }
    assert {i: r.status for i, r in records(db).items()} == dict.fromkeys(before, "published")
    assert count_published(db, NAME) == len(publishable)

    # Re-validation: exactly the records the new version rejects are withdrawn.
    materialise(strict, instance, partitions)
    after = records(db)
    assert set(after) == set(before)
    withdrawn = {i for i, r in after.items() if r.status == "withdrawn"}
    assert withdrawn == too_small
    for source_id in too_small:
        record = after[source_id]
        assert record.srn == before[source_id].srn
        assert record.status_reason is not None and record.status_changed_at is not None
        assert record.status_reason.startswith(f"rejected by validate_structure {new_version}")
        assert "polymer residues" in record.status_reason
    for source_id in publishable - too_small:
        kept = after[source_id]
        assert (kept.srn, kept.status, kept.published_at, kept.record_metadata) == (
            before[source_id].srn,
            "published",
            before[source_id].published_at,
            before[source_id].record_metadata,
        )
    assert count_published(db, NAME) == len(publishable - too_small)
    # Only the changed hook ran: extract_features made no attempt since the first ingest.
    assert attempts_of(NAME, "extract_features", partitions) == features_attempts
    assert {s for s, _ in stale_status(instance, strict, VALIDATE, partitions).values()} == {
        StaleStatus.FRESH
    }
    skipped = sensor(
        dg.build_sensor_context(instance=instance, definitions=strict, resources=resources)
    )
    assert isinstance(skipped, dg.SkipReason)
    # Provenance: every hook version that judged the record and a digest of each file.
    features_version = hook_version(convention.hook("extract_features"))
    for source_id in publishable - too_small:
        provenance = after[source_id].provenance
        assert provenance is not None
        assert provenance["hooks"]["validate_structure"]["version"] == new_version
        assert provenance["hooks"]["extract_features"]["version"] == features_version
        assert provenance["source"]["name"] == "mirror"
        [file] = provenance["files"]
        batch = BatchLayout(NAME, provenance["batch"])
        stored = [k for k in store.list_keys(batch.raw_files) if k.endswith("/" + file["name"])]
        assert file["sha256"] == hashlib.sha256(store.read_bytes(stored[0])).hexdigest()
    assert main(["records", "--convention", NAME, "--provenance", "--limit", "100"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(f"validate_structure {new_version}: passed") == len(
        publishable - too_small
    )
    assert listing.count("  withdrawn ") == len(too_small)

    # The old validator back: the dry run predicts the reinstatements; nothing runs.
    restored = load(None, monkeypatch)
    predicted = dry_run(partitions)
    assert predicted["reinstate"]["count"] == len(too_small)
    assert ids_of(predicted["reinstate"]) == too_small
    assert predicted["withdraw"]["count"] == 0 and predicted["add"]["count"] == 0
    materialise(restored, instance, partitions)
    final = records(db)
    assert {i for i, r in final.items() if r.status == "published"} == publishable
    assert all(final[i].srn == before[i].srn for i in publishable)
    assert all(final[i].status_reason.startswith("passed by") for i in too_small)
    assert attempts_of(NAME, "validate_structure", partitions) == validate_attempts
    assert attempts_of(NAME, "extract_features", partitions) == features_attempts
