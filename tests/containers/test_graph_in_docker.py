"""The whole asset graph over the bundled PDB mirror, every hook attempt in a container."""

from __future__ import annotations

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from tests.test_pdb_end_to_end import MIRROR, expected_publishable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ingested_in_docker(tmp_path_factory, docker_client, pdb_hook_image):
    base = tmp_path_factory.mktemp("pdb-docker")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OSA_DATA_DIR", str(base / "data"))
        patch.setenv("OSA_HOOK_RUNNER", "docker")
        with dg.instance_for_test(temp_dir=str(base)) as instance:
            defs = build_definitions()
            planned = defs.resolve_job_def("pdb_plan").execute_in_process(
                run_config={"ops": {"pdb_plan_batches": {"config": {"batch_size": 25}}}},
                instance=instance,
            )
            assert planned.success
            job = defs.resolve_job_def("pdb_ingest")
            results = [
                job.execute_in_process(partition_key=key, instance=instance)
                for key in instance.get_dynamic_partitions("pdb_batches")
            ]
            yield results, RecordsDatabase(database_url(Settings.from_env()))


def test_the_mirror_is_published_through_hook_containers(ingested_in_docker):
    results, db = ingested_in_docker
    assert results and all(r.success for r in results)
    expected = {pdb_id for pdb_id, path in mirror_entries(MIRROR) if expected_publishable(path)}
    with db.session() as session:
        published = set(session.scalars(select(Record.source_id)))
        atoms = session.scalars(
            select(Feature.data).where(Feature.hook == "extract_features")
        ).all()
    assert published == expected
    assert len(atoms) == len(expected) and all(row["atoms"] > 0 for row in atoms)


def test_attempts_ran_in_containers_and_the_largest_entry_was_oom_killed(ingested_in_docker):
    results, _ = ingested_in_docker
    observations = [
        e.asset_observation_data.asset_observation.metadata
        for result in results
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    attempts = [o for o in observations if "memory_limit_mb" in o]
    assert attempts
    oom = [o for o in attempts if o["oom_killed"].value]
    assert oom, "no container was OOM-killed: the pdb memory ladder no longer forces one"
    assert all(o["memory_limit_mb"].value == 192 for o in oom)
