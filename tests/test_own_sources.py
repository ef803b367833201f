"""A user's own data through the whole graph, configured without code.

Each bundled convention reads a folder made here from real data: a flat folder of mmCIF
files (OSA_SOURCES), a folder of UniProt flat files (the plan job's run config, as the
launchpad sets it) and a GEO folder holding one accession twice (OSA_SOURCES). The
unusable files are skipped with their reason in the plan's metadata, and the rest is
published.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.conventions.geo.ingester import DEFAULT_FOLDER as GEO_DATA
from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, entry_path
from osa_dagster.conventions.uniprot.ingester import DEFAULT_FLAT_FILE
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.jobs import SKIPPED_METADATA
from osa_dagster.records import Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings

pytestmark = pytest.mark.slow


def plan_and_ingest(
    instance: dg.DagsterInstance, convention: str, plan_config: dict[str, object]
) -> tuple[dict[str, str], set[str]]:
    """Plan with `plan_config`, materialise every batch; the skipped files with their
    reasons, and the source ids published."""
    defs = build_definitions()
    planned = defs.resolve_job_def(f"{convention}_plan").execute_in_process(
        run_config={"ops": {f"{convention}_plan_batches": {"config": plan_config}}},
        instance=instance,
    )
    assert planned.success
    [output] = [e for e in planned.all_events if e.event_type_value == "STEP_OUTPUT"]
    table = output.event_specific_data.metadata[SKIPPED_METADATA]
    skipped = {row.data["file"]: row.data["reason"] for row in table.records}
    job = defs.resolve_job_def(f"{convention}_ingest")
    for key in instance.get_dynamic_partitions(f"{convention}_batches"):
        assert job.execute_in_process(partition_key=key, instance=instance).success
    with RecordsDatabase(database_url(Settings.from_env())).session() as session:
        query = select(Record.source_id).where(Record.convention == convention)
        published = set(session.scalars(query))
    return skipped, published


def test_a_flat_folder_of_mmcif_files_from_osa_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "my structures"
    folder.mkdir()
    shutil.copy(entry_path(DEFAULT_MIRROR, "1UBI"), folder / "ubiquitin.cif.gz")
    (folder / "bpti.cif").write_bytes(
        gzip.decompress(entry_path(DEFAULT_MIRROR, "5PTI").read_bytes())
    )
    shutil.copy(entry_path(DEFAULT_MIRROR, "5PTI"), folder / "z-bpti-again.cif.gz")
    shutil.copy(entry_path(DEFAULT_MIRROR, "1OSM"), folder / "1osm.cif.gz")
    monkeypatch.setenv("OSA_SOURCES", f"pdb={folder}")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        skipped, published = plan_and_ingest(instance, "pdb", {})
    assert skipped == {"z-bpti-again.cif.gz": "entry 5PTI repeats bpti.cif, kept instead"}
    # 1OSM, a real entry whose file is cut short, is planned, and rejected by the hooks.
    assert published == {"1UBI", "5PTI"}


def test_a_folder_of_uniprot_flat_files_from_the_plan_run_config(tmp_path: Path) -> None:
    entries = gzip.decompress(DEFAULT_FLAT_FILE.read_bytes()).decode().split("//\n")[:12]
    texts = [entry + "//\n" for entry in entries]
    folder = tmp_path / "uniprot"
    folder.mkdir()
    (folder / "part1.dat").write_text("".join(texts[:7]))
    (folder / "part2.dat.gz").write_bytes(gzip.compress("".join(texts[5:]).encode()))
    (folder / "part3.dat.gz").write_bytes(b"\x1f\x8b this is not gzip")
    accessions = [text.split("AC   ", 1)[1].split(";", 1)[0] for text in texts]
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        skipped, published = plan_and_ingest(instance, "uniprot", {"source": str(folder)})
    assert published == set(accessions)
    repeats = {where: reason for where, reason in skipped.items() if "repeats" in reason}
    assert sorted(repeats.values()) == sorted(
        f"entry {accession} repeats part1.dat line {line}"
        for accession, line in [
            (accessions[5], "".join(texts[:5]).count("\n") + 1),
            (accessions[6], "".join(texts[:6]).count("\n") + 1),
        ]
    )
    assert skipped["part3.dat.gz"].startswith("cannot be read past what was planned from it")


def test_a_geo_folder_with_one_accession_twice_from_osa_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "geo"
    (folder / "samples").mkdir(parents=True)
    shutil.copy(GEO_DATA / "GDS507.soft.gz", folder / "GDS507.soft.gz")
    shutil.copy(GEO_DATA / "GSM11805.txt.gz", folder / "samples" / "GSM11805.txt.gz")
    (folder / "samples" / "GSM11805-copy.txt").write_bytes(
        gzip.decompress((GEO_DATA / "GSM11805.txt.gz").read_bytes())
    )
    monkeypatch.setenv("OSA_SOURCES", f"geo={folder}")
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        skipped, published = plan_and_ingest(instance, "geo", {})
    assert skipped == {
        "samples/GSM11805.txt.gz": "GSM11805 is in samples/GSM11805-copy.txt already, which is kept"
    }
    assert published == {"GDS507", "GSM11805"}


def test_a_source_that_cannot_be_read_fails_the_plan_in_one_line(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        planned = (
            build_definitions()
            .resolve_job_def("geo_plan")
            .execute_in_process(
                run_config={"ops": {"geo_plan_batches": {"config": {"source": "/no/such/folder"}}}},
                instance=instance,
                raise_on_error=False,
            )
        )
    assert not planned.success
    [failure] = [e for e in planned.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.event_specific_data.error.message.strip().endswith(
        "source: geo: '/no/such/folder' is not one of its sources ['folder', 'ncbi'], "
        "nor a folder or file that exists"
    )


def test_osa_plan_names_the_skipped_file_on_stderr_and_the_batches_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from osa_dagster.cli import main

    folder = tmp_path / "geo"
    folder.mkdir()
    shutil.copy(GEO_DATA / "GSM11805.txt.gz", folder / "GSM11805.txt.gz")
    shutil.copy(GEO_DATA / "GSM11805.txt.gz", folder / "later-copy.txt.gz")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("")
    assert main(["plan", "geo", "--source", str(folder)]) == 0
    out, err = capsys.readouterr()
    [(key, records, mark)] = [line.split() for line in out.splitlines()]  # the one file kept
    assert key.startswith("GSM11805-GSM11805-") and (records, mark) == ("1", "new")
    assert "skipped later-copy.txt.gz: GSM11805 is in GSM11805.txt.gz already, which is kept" in (
        err.splitlines()
    )
