"""The bundled PDB mirror through the whole Dagster graph, checked against gemmi itself."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import gemmi
import pytest
from sqlalchemy import select

from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings

MIRROR = Path(__file__).resolve().parents[1] / "osa_dagster/conventions/pdb/mirror"
BATCH_SIZE = 10


def expected_publishable(path: Path) -> bool:
    """An entry gemmi reads, with atoms and at least one protein or nucleic-acid chain."""
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError):
        return False
    structure.setup_entities()
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        return False
    return any(len(chain.get_polymer()) > 0 for chain in structure[0])


def _resolution(path: Path) -> float | None:
    """Read straight from the mmCIF: refinement resolution (X-ray), else the EM map's."""
    block = gemmi.cif.read(str(path)).sole_block()
    for tag in ("_refine.ls_d_res_high", "_em_3d_reconstruction.resolution"):
        value = block.find_value(tag)
        if value not in (None, "?", "."):
            return float(value)
    return None


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    """Plan the whole mirror and materialise every partition, once for this module."""
    base = tmp_path_factory.mktemp("pdb")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OSA_DATA_DIR", str(base / "data"))
        patch.delenv("OSA_HOOK_MEMORY", raising=False)
        patch.delenv("OSA_CONVENTIONS", raising=False)
        with dg.instance_for_test(temp_dir=str(base)) as instance:
            defs = build_definitions()
            planned = defs.resolve_job_def("pdb_plan").execute_in_process(
                run_config={"ops": {"pdb_plan_batches": {"config": {"batch_size": BATCH_SIZE}}}},
                instance=instance,
            )
            assert planned.success
            keys = instance.get_dynamic_partitions("pdb_batches")
            job = defs.resolve_job_def("pdb_ingest")
            results = {
                key: job.execute_in_process(partition_key=key, instance=instance) for key in keys
            }
            db = RecordsDatabase(database_url(Settings.from_env()))
            yield base / "data", instance, job, results, db


def test_every_partition_materialises(ingested):
    _, _, _, results, _ = ingested
    entries = mirror_entries(MIRROR)
    assert len(results) == -(-len(entries) // BATCH_SIZE)
    assert all(result.success for result in results.values())


def test_published_records_are_exactly_what_gemmi_can_read(ingested):
    *_, db = ingested
    expected = {pdb_id for pdb_id, path in mirror_entries(MIRROR) if expected_publishable(path)}
    with db.session() as session:
        published = set(session.scalars(select(Record.source_id).where(Record.convention == "pdb")))
    assert published == expected
    assert len(expected) >= 30


def test_features_agree_with_gemmi(ingested):
    *_, db = ingested
    paths = dict(mirror_entries(MIRROR))
    with db.session() as session:
        rows = session.execute(
            select(Record.source_id, Feature.data)
            .join(Feature, Feature.record_srn == Record.srn)
            .where(Feature.hook == "extract_features")
        ).all()
    assert rows
    for source_id, features in rows:
        structure = gemmi.read_structure(str(paths[source_id]))
        assert features["atoms"] == structure[0].count_atom_sites(), source_id
        assert features["models"] == len(structure), source_id
        expected_resolution = _resolution(paths[source_id])
        if expected_resolution is None:
            assert features["resolution_a"] is None, source_id
        else:
            assert features["resolution_a"] == pytest.approx(expected_resolution), source_id


def test_the_largest_entry_is_oom_killed_and_climbs_the_ladder(ingested):
    *_, results, _ = ingested
    attempts = [
        e.asset_observation_data.asset_observation.metadata
        for result in results.values()
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
        and "memory_limit_mb" in e.asset_observation_data.asset_observation.metadata
    ]
    oom = [o for o in attempts if o["oom_killed"].value]
    assert oom, "no attempt ran out of memory: the demo memory settings no longer force one"
    # The hook step climbed the ladder: an attempt ran above the limit the kernel killed at.
    assert any(o["memory_limit_mb"].value > oom[0]["memory_limit_mb"].value for o in attempts)


def test_rematerialising_a_partition_adds_no_rows(ingested, monkeypatch):
    data_dir, instance, job, results, db = ingested
    monkeypatch.setenv("OSA_DATA_DIR", str(data_dir))  # the module's store, not this test's
    with db.session() as session:
        before = (
            len(session.scalars(select(Record.srn)).all()),
            len(session.scalars(select(Feature.id)).all()),
        )
    key = next(iter(results))
    assert job.execute_in_process(partition_key=key, instance=instance).success
    with db.session() as session:
        after = (
            len(session.scalars(select(Record.srn)).all()),
            len(session.scalars(select(Feature.id)).all()),
        )
    assert after == before
