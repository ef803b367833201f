"""Running again is safe: range re-runs on SQLite and PostgreSQL instances record every
partition's check verdict, and dead letters are retried by the command `osa dead-letters`
prints, with the memory settings in force."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.cli import main
from osa_dagster.definitions import build_definitions
from osa_dagster.local_postgres import PgCluster
from osa_dagster.records import PoisonRecord, RecordsDatabase, database_url
from osa_dagster.records.dead_letters import replace_dead_letters
from osa_dagster.settings import Settings
from tests.fixtures.check_status import all_check_statuses
from tests.fixtures.toy_convention import TOY_IDS
from tests.ui.conftest import DagsterSite, make_site

OSA = str(Path(sys.executable).parent / "osa")


def _range_run(defs: dg.Definitions, instance: dg.DagsterInstance, keys: list[str]) -> bool:
    result = defs.resolve_job_def("toy_ingest").execute_in_process(
        instance=instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    return result.success


@pytest.mark.slow
def test_range_re_runs_on_a_postgres_instance_record_every_verdict(
    toy_conventions, postgres: PgCluster, tmp_path: Path
):
    url = f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    overrides = {"storage": {"postgres": {"postgres_url": url}}}
    defs = build_definitions()
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        plan = defs.resolve_job_def("toy_plan").execute_in_process(
            run_config={"ops": {"toy_plan_batches": {"config": {"limit": 10, "batch_size": 5}}}},
            instance=instance,
        )
        assert plan.success
        keys = instance.get_dynamic_partitions("toy_batches")
        for run in range(3):
            assert _range_run(defs, instance, keys), f"range run {run + 1}"
        statuses = all_check_statuses(instance, "toy")
        assert statuses == {check: dict.fromkeys(keys, "SUCCEEDED") for check in statuses}


def _poison(limit_mb: int) -> list[PoisonRecord]:
    return [
        PoisonRecord(
            source_id=record,
            hook="hungry",
            size_mb=0.01,
            limit_mb=limit_mb,
            peak_mb=None,
            reason=f"poison: OOM alone at {limit_mb} MB",
        )
        for record in (TOY_IDS[1], TOY_IDS[3])
    ]


def _printed_retry(output: str) -> tuple[dict[str, str], list[str]]:
    """The OSA_HOOK_MEMORY entries and the command of the retry `osa dead-letters` printed."""
    assignment, *command = shlex.split(output.strip().splitlines()[-1])
    name, _, value = assignment.partition("=")
    assert name == "OSA_HOOK_MEMORY"
    return dict(entry.split("=") for entry in value.split(",")), command


@pytest.mark.parametrize(
    ("in_force", "printed"),
    [
        # A run with a lowered base dead-lettered two records at the cap of the day, 256 MB:
        # the base in force stays, the cap doubles, and the other hook's setting is kept.
        (
            "toy.check_size=300:600,toy_poison.hungry=64:256",
            {"toy.check_size": "300:600", "toy_poison.hungry": "64:512"},
        ),
        # A cap raised already is not lowered by the retry.
        ("toy_poison.hungry=128:2048", {"toy_poison.hungry": "128:2048"}),
    ],
)
def test_the_retry_keeps_the_memory_settings_in_force(
    toy_conventions, monkeypatch, capsys, in_force: str, printed: dict[str, str]
):
    monkeypatch.setenv("OSA_HOOK_MEMORY", in_force)
    db = RecordsDatabase(database_url(Settings.from_env()))
    replace_dead_letters(db, convention="toy_poison", partition="p1", poison=_poison(256))

    assert main(["dead-letters", "toy_poison"]) == 0
    entries, command = _printed_retry(capsys.readouterr().out)
    assert entries == printed
    assert command[1:] == ["materialize", "toy_poison", "--dead-letters"]


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("toy_poison.hungry=512:256", "the cap (256 MB) is below the base (512 MB)"),
        ("toy_poison.hungry=1024", "the base is above the hook's cap (256 MB)"),
    ],
)
def test_a_cap_below_the_base_is_one_line_naming_the_variable(
    toy_conventions, monkeypatch, capsys, setting: str, says: str
):
    monkeypatch.setenv("OSA_HOOK_MEMORY", setting)
    assert main(["dead-letters", "toy_poison"]) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert "OSA_HOOK_MEMORY" in line and says in line
    assert captured.out == ""


@pytest.fixture
def toy_site(tmp_path: Path) -> DagsterSite:
    site = make_site(tmp_path)
    site.env["OSA_CONVENTIONS"] = "tests.fixtures.toy_convention"
    return site


def _summary(site: DagsterSite, convention: str) -> dict[str, int]:
    lines = site.run(OSA, "summary", convention).stdout.splitlines()
    return {name.strip(): int(value) for name, value in (line.rsplit(maxsplit=1) for line in lines)}


def _runs(site: DagsterSite) -> int:
    with dg.DagsterInstance.from_config(str(site.home)) as instance:
        return instance.get_runs_count()


@pytest.mark.slow
def test_the_printed_retry_command_publishes_the_poison_records(toy_site: DagsterSite):
    toy_site.run(OSA, "plan", "toy_poison")
    toy_site.run(OSA, "materialize", "toy_poison")
    assert _summary(toy_site, "toy_poison")["records in the archive"] == 4

    listing = toy_site.run(OSA, "dead-letters", "toy_poison").stdout
    assert TOY_IDS[1] in listing and TOY_IDS[3] in listing
    printed = listing.strip().splitlines()[-1].strip()
    assert printed.endswith(f"{shlex.quote(OSA)} materialize toy_poison --dead-letters")
    # Run exactly as printed, by a shell.
    subprocess.run(["sh", "-c", printed], env=toy_site.env, cwd=toy_site.home, check=True)

    assert "has no dead letters" in toy_site.run(OSA, "dead-letters", "toy_poison").stdout
    assert _summary(toy_site, "toy_poison")["records in the archive"] == 6
    # With none left, a retry of the dead letters runs nothing.
    runs = _runs(toy_site)
    again = toy_site.run(OSA, "materialize", "toy_poison", "--dead-letters")
    assert again.stdout.strip() == "toy_poison has no dead letters: nothing to run"
    assert _runs(toy_site) == runs


@pytest.mark.slow
def test_after_the_demo_two_more_runs_succeed_and_every_check_has_its_verdict(tmp_path: Path):
    site = make_site(tmp_path)
    site.run(OSA, "demo", timeout_s=900)
    for _ in range(2):
        rerun = site.run(OSA, "materialize", "pdb", timeout_s=900)
        assert "FAILED" not in rerun.stdout
    with dg.DagsterInstance.from_config(str(site.home)) as instance:
        keys = instance.get_dynamic_partitions("pdb_batches")
        statuses = all_check_statuses(instance, "pdb")
    assert len(keys) >= 5
    assert statuses == {check: dict.fromkeys(keys, "SUCCEEDED") for check in statuses}
