"""The bundled GEO records through the whole Dagster graph, checked against their own lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings

DATA = Path(__file__).resolve().parents[1] / "osa_dagster/conventions/geo/data"
BATCH_SIZE = 2

pytestmark = pytest.mark.slow


def attribute_values(file_name: str, key: str) -> list[str]:
    prefix = f"!{key} = "
    with gzip.open(DATA / file_name, "rt", encoding="utf-8") as stream:
        return [line[len(prefix) :].strip() for line in stream if line.startswith(prefix)]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    """Plan the bundled folder and materialise every partition, once for this module."""
    base = tmp_path_factory.mktemp("geo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OSA_DATA_DIR", str(base / "data"))
        patch.delenv("OSA_HOOK_MEMORY", raising=False)
        # Not among the bundled conventions yet: loaded the way a user loads their own.
        patch.setenv("OSA_CONVENTIONS", "osa_dagster.conventions.geo")
        with dg.instance_for_test(temp_dir=str(base)) as instance:
            defs = build_definitions()
            planned = defs.resolve_job_def("geo_plan").execute_in_process(
                run_config={"ops": {"geo_plan_batches": {"config": {"batch_size": BATCH_SIZE}}}},
                instance=instance,
            )
            assert planned.success
            keys = instance.get_dynamic_partitions("geo_batches")
            job = defs.resolve_job_def("geo_ingest")
            results = {
                key: job.execute_in_process(partition_key=key, instance=instance) for key in keys
            }
            yield results, RecordsDatabase(database_url(Settings.from_env()))


def test_every_partition_materialises(ingested):
    results, _ = ingested
    assert len(results) == 2  # 3 records in batches of 2
    assert all(result.success for result in results.values())


def test_every_bundled_record_is_published(ingested):
    _, db = ingested
    with db.session() as session:
        published = set(session.scalars(select(Record.source_id).where(Record.convention == "geo")))
    assert published == {"GDS507", "GSE781", "GSM11805"}


def test_features_agree_with_the_files(ingested):
    _, db = ingested
    with db.session() as session:
        rows = dict(
            session.execute(
                select(Record.source_id, Feature.data)
                .join(Feature, Feature.record_srn == Record.srn)
                .where(Record.convention == "geo", Feature.hook == "extract_features")
            ).all()
        )
    assert set(rows) == {"GDS507", "GSE781", "GSM11805"}
    series_samples = attribute_values("GSE781_family.soft.gz", "Series_sample_id")
    assert rows["GSE781"]["samples"] == series_samples
    assert rows["GSE781"]["sample_count"] == len(series_samples)
    assert rows["GSE781"]["platforms"] == attribute_values(
        "GSE781_family.soft.gz", "Series_platform_id"
    )
    assert rows["GDS507"]["sample_count"] == int(
        attribute_values("GDS507.soft.gz", "dataset_sample_count")[0]
    )
    assert rows["GSM11805"]["table_rows"] == int(
        attribute_values("GSM11805.txt.gz", "Sample_data_row_count")[0]
    )
    assert rows["GSM11805"]["organisms"] == attribute_values(
        "GSM11805.txt.gz", "Sample_organism_ch1"
    )
