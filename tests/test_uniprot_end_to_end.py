"""The 100 bundled Swiss-Prot entries through the whole Dagster graph of the uniprot convention.

Expected values are read from the flat file here, without Biopython: each entry's primary
accession (first AC token) and the length and weight of its SQ line.
"""

from __future__ import annotations

import gzip
import re

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.conventions.uniprot.ingester import DEFAULT_FLAT_FILE
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings

BATCH_SIZE = 25

pytestmark = pytest.mark.slow


def sample_entries() -> dict[str, tuple[int, int]]:
    """Primary accession -> (length, weight) declared by the SQ line, for every entry."""
    text = gzip.decompress(DEFAULT_FLAT_FILE.read_bytes()).decode("ascii")
    accessions = re.findall(r"^ID   .*?\nAC   (\w+);", text, flags=re.M)
    declared = re.findall(r"^SQ   SEQUENCE\s+(\d+) AA;\s+(\d+) MW;", text, flags=re.M)
    assert len(accessions) == len(declared) == 100
    return {a: (int(n), int(w)) for a, (n, w) in zip(accessions, declared, strict=True)}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    """Plan the whole sample and materialise every partition, once for this module."""
    base = tmp_path_factory.mktemp("uniprot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OSA_DATA_DIR", str(base / "data"))
        patch.delenv("OSA_HOOK_MEMORY", raising=False)
        patch.setenv("OSA_CONVENTIONS", "osa_dagster.conventions.uniprot")
        with dg.instance_for_test(temp_dir=str(base)) as instance:
            defs = build_definitions()
            planned = defs.resolve_job_def("uniprot_plan").execute_in_process(
                run_config={
                    "ops": {"uniprot_plan_batches": {"config": {"batch_size": BATCH_SIZE}}}
                },
                instance=instance,
            )
            assert planned.success
            keys = instance.get_dynamic_partitions("uniprot_batches")
            job = defs.resolve_job_def("uniprot_ingest")
            results = {
                key: job.execute_in_process(partition_key=key, instance=instance) for key in keys
            }
            yield results, RecordsDatabase(database_url(Settings.from_env()))


def test_every_partition_materialises(ingested) -> None:
    results, _ = ingested
    assert len(results) == 100 // BATCH_SIZE
    assert all(result.success for result in results.values())


def test_all_100_entries_are_published_with_their_metadata(ingested) -> None:
    _, db = ingested
    expected = sample_entries()
    with db.session() as session:
        rows = session.execute(
            select(Record.source_id, Record.record_metadata).where(Record.convention == "uniprot")
        ).all()
    assert {source_id for source_id, _ in rows} == set(expected)
    for source_id, metadata in rows:
        assert metadata["accession"] == source_id
        assert metadata["sequence_length"] == expected[source_id][0]
        assert metadata["source"] == "flatfile:SWISS100.dat.gz"


def test_features_agree_with_the_sq_lines(ingested) -> None:
    _, db = ingested
    expected = sample_entries()
    with db.session() as session:
        rows = session.execute(
            select(Record.source_id, Feature.hook, Feature.data).join(
                Feature, Feature.record_srn == Record.srn
            )
        ).all()
    # validate_sequence passes records without feature rows; extract_features gives one each.
    assert {hook for _, hook, _ in rows} == {"extract_features"}
    assert sorted(source_id for source_id, _, _ in rows) == sorted(expected)
    for source_id, _, features in rows:
        length, weight = expected[source_id]
        assert features["sequence_length"] == length
        assert abs(features["mass_da"] - weight) <= 0.5 + 1.5e-5 * weight, source_id
        assert features["taxonomy_id"] == 9606
        assert features["keywords"], source_id


def test_no_hook_ran_out_of_memory(ingested) -> None:
    results, _ = ingested
    observations = [
        event.asset_observation_data.asset_observation.metadata
        for result in results.values()
        for event in result.all_events
        if event.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    attempts = [o for o in observations if "memory_limit_mb" in o]
    assert attempts, "the hook steps reported no attempts"
    assert not any(o["oom_killed"].value for o in attempts)
    assert {o["memory_limit_mb"].value for o in attempts} == {128}
