"""Upstream changes through the whole graph: a copy of the bundled PDB mirror is ingested,
then entries are removed from it, one is revised and one declared obsolete. `osa plan
--dry-run` says what planning again will do, changing nothing; planning again and running
the new batches then does exactly that, record by record, and publishes nothing twice."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, entry_path
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Record, RecordsDatabase, database_url, open_database
from osa_dagster.records.models import RecordEvent
from osa_dagster.settings import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.slow

REMOVED = ["1UBI", "5PTI"]
REVISED = "1A28"
OBSOLETE = "6WG6"
SUCCESSOR = "9ZZZ"


def plan_and_ingest(instance: dg.DagsterInstance) -> None:
    """Plan the whole source, then materialise the batches this plan made."""
    defs = build_definitions()
    known = set(instance.get_dynamic_partitions("pdb_batches"))
    planned = defs.resolve_job_def("pdb_plan").execute_in_process(instance=instance)
    assert planned.success
    job = defs.resolve_job_def("pdb_ingest")
    for key in sorted(set(instance.get_dynamic_partitions("pdb_batches")) - known):
        assert job.execute_in_process(partition_key=key, instance=instance).success


def published(db: RecordsDatabase) -> dict[str, tuple[str, str, str | None, dict]]:
    """source id -> (SRN, status, version, metadata) of every pdb record."""
    with db.session() as session:
        rows = session.execute(
            select(
                Record.source_id,
                Record.srn,
                Record.status,
                Record.record_version,
                Record.record_metadata,
            ).where(Record.convention == "pdb")
        )
        return {source_id: tuple(rest) for source_id, *rest in rows}  # type: ignore[misc]


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def revise(path: Path) -> None:
    """What the wwPDB does to a revised entry's file: new bytes, a newer time."""
    with gzip.open(path, "rt") as entry:
        text = entry.read()
    with gzip.open(path, "wt") as entry:
        entry.write(text + "# revised\n")
    later = path.stat().st_mtime + 86_400
    os.utime(path, (later, later))


def test_removed_revised_and_obsolete_entries_as_the_dry_run_said(
    tmp_path: Path, isolated_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(DEFAULT_MIRROR, mirror)
    monkeypatch.setenv("OSA_SOURCES", f"pdb={mirror}")
    db = RecordsDatabase(database_url(Settings.from_env()))
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        plan_and_ingest(instance)
        before = published(db)
        assert {*REMOVED, REVISED, OBSOLETE} <= set(before)

        for pdb_id in REMOVED:
            entry_path(mirror, pdb_id).unlink()
        revise(entry_path(mirror, REVISED))
        (mirror / "obsolete.dat").write_text(
            " LIST OF OBSOLETE COORDINATE ENTRIES AND SUCCESSORS\n"
            f"OBSLTE    07-DEC-26 {OBSOLETE}     {SUCCESSOR}\n"
        )
        # Every connection closed, the WAL checkpointed: the file holds every row.
        db.engine.dispose()
        open_database(database_url(Settings.from_env())).engine.dispose()
        untouched = files(isolated_data_dir)

        env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
        env |= {
            "DAGSTER_HOME": str(tmp_path / "dagster"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        dry = subprocess.run(
            [sys.executable, "-m", "osa_dagster.cli", "plan", "pdb", "--dry-run", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert dry.returncode == 0, dry.stderr
        report = json.loads(dry.stdout)

        now = files(isolated_data_dir)
        changed = sorted(k for k in {*now, *untouched} if now.get(k) != untouched.get(k))
        assert changed == []  # no manifest, no index, no row
        said = {
            kind: {example["source_id"]: example for example in change["examples"]}
            for kind, change in report["changes"].items()
        }
        assert {kind: change["count"] for kind, change in report["changes"].items()} == {
            "add": 0,
            "revise": 1,
            "withdraw": 3,
            "reinstate": 0,
        }
        assert set(said["withdraw"]) == {*REMOVED, OBSOLETE}
        assert (
            said["withdraw"][OBSOLETE]["detail"] == f"obsolete upstream, superseded by {SUCCESSOR}"
        )
        assert set(said["revise"]) == {REVISED}
        assert said["revise"][REVISED]["srn"] == before[REVISED][0]

        plan_and_ingest(instance)

    after = published(db)
    assert set(after) == set(before)  # nothing published twice, nothing lost
    withdrawn = {source_id for source_id, row in after.items() if row[1] == "withdrawn"}
    assert withdrawn == set(said["withdraw"])
    with db.session() as session:
        events = session.execute(
            select(Record.source_id, RecordEvent.event, RecordEvent.reason).join(
                Record, Record.srn == RecordEvent.srn
            )
        ).all()
    assert {s for s, event, _ in events if event == "revised"} == set(said["revise"])
    assert {s: reason for s, event, reason in events if event == "withdrawn"} == {
        s: example["detail"] for s, example in said["withdraw"].items()
    }
    # The revision holds the new file under the SRN it had.
    srn, status, version, metadata = after[REVISED]
    assert (srn, status) == (before[REVISED][0], "published")
    assert version != before[REVISED][2]
    assert metadata["source_modified_at"] != before[REVISED][3]["source_modified_at"]
