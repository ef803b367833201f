"""The `osa` command as a person or a script meets it: one line per bad input and nothing
created, reading commands that only read, machine-readable output, no Dagster noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.defs.run_worker import WORKER_TAG
from osa_dagster.engine.process_identity import ProcessIdentity
from tests.conftest import REPO
from tests.fixtures.toy_convention import TOY_IDS


def tree(folder: Path) -> list[str]:
    """Every path under `folder`, for comparing before and after a command."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def osa(
    *args: str, env: dict[str, str], cwd: Path, wrap: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [*(wrap or []), sys.executable, "-m", "osa_dagster.cli", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def site(tmp_path: Path, isolated_data_dir: Path) -> tuple[Path, dict[str, str]]:
    """A Dagster home and data folder of their own, under tmp_path; the environment."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSA_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(home),
        "OSA_DATA_DIR": str(isolated_data_dir),
        "OSA_CONVENTIONS": "tests.fixtures.toy_convention",
        "PYTHONPATH": str(REPO),
    }
    return tmp_path, env


BAD_PLAN_ARGUMENTS = [
    (["--limit", "0"], "--limit: must be a positive number of records, not 0"),
    (["--limit", "-5"], "--limit: must be a positive number of records, not -5"),
    (
        ["--limit", "99999999999999999999999"],
        "--limit: 99999999999999999999999 is more records than this machine can count",
    ),
    (["--batch-size", "0"], "--batch-size: must be a positive number of records, not 0"),
    (["--since", "notadate"], "--since: 'notadate' is not an ISO date or datetime"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arguments", "message"), BAD_PLAN_ARGUMENTS)
def test_a_bad_plan_argument_is_one_line_and_launches_nothing(site, arguments, message):
    root, env = site
    before = tree(root)
    result = osa("plan", "toy", *arguments, env=env, cwd=root)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"osa plan: {message}"), result.stderr
    # No run recorded (the instance's storage was never even opened), no data folder made.
    assert tree(root) == before


@pytest.mark.slow
def test_debug_shows_the_traceback(site):
    root, env = site
    result = osa("plan", "toy", "--limit", "0", "--debug", env=env, cwd=root)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "must be a positive number of records, not 0" in result.stderr


@pytest.mark.slow
def test_reading_a_missing_data_folder_is_an_error_that_creates_nothing(site, tmp_path):
    root, env = site
    missing = tmp_path / "nonexistent" / "x"
    for command in (
        ["summary", "toy"],
        ["records"],
        ["rejections", "toy"],
        ["dead-letters", "toy"],
    ):
        result = osa(*command, env=env | {"OSA_DATA_DIR": str(missing)}, cwd=root)
        assert result.returncode == 2, result
        assert result.stderr == (
            f"osa {command[0]}: OSA_DATA_DIR: {missing} is not a folder (nothing was ingested "
            "there; `osa plan` and `osa materialize` make it)\n"
        )
        assert not missing.parent.exists()


@pytest.mark.slow
def test_plan_marks_new_batches_and_reading_commands_work_read_only(site, isolated_data_dir):
    root, env = site
    first = osa("plan", "toy", "--limit", "5", "--batch-size", "5", "--json", env=env, cwd=root)
    assert first.returncode == 0, first.stderr
    planned = json.loads(first.stdout)
    [batch] = planned["batches"]
    assert (batch["new"], batch["records"], planned["truncated"]) == (True, 5, False)
    assert planned["totals"] == {
        "batches": 1,
        "new_batches": 1,
        "records": 5,
        "new_records": 5,
        "already_planned": 0,
        "duplicates_dropped": 0,
    }
    more = osa("plan", "toy", "--limit", "12", "--batch-size", "5", env=env, cwd=root)
    assert more.returncode == 0, more.stderr
    # Only the seven records not planned yet are planned, in two new batches.
    [second_key, second_size, marker, third_key, third_size, _] = more.stdout.split()
    assert (second_size, third_size, marker) == ("5", "2", "new")
    assert more.stderr.splitlines()[-1] == (
        "2 batches of 7 records, 2 of them new (7 records); 5 left out, planned before"
    )
    # Planned again, the batches are the same frozen batches as before: none is new.
    again = osa("plan", "toy", "--limit", "12", "--batch-size", "5", "--replan", env=env, cwd=root)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (f"{batch['partition']}  5\n{second_key}  5\n{third_key}  2\n")
    assert again.stderr.splitlines()[-1] == "3 batches of 12 records, 0 of them new (0 records)"
    ingested = osa("materialize", "toy", batch["partition"], env=env, cwd=root)
    assert ingested.returncode == 0, ingested.stderr

    # A read-only bind mount: even root cannot write there, so any file a reading command
    # tried to create (a lock, a journal, a folder) would fail it.
    read_only = ["bwrap", "--bind", "/", "/", "--ro-bind", str(isolated_data_dir)]
    read_only += [str(isolated_data_dir), "--dev", "/dev", "--proc", "/proc"]
    before = tree(isolated_data_dir)

    summary = osa("summary", "toy", "--json", env=env, cwd=root, wrap=read_only)
    assert summary.returncode == 0, summary.stderr
    counts = json.loads(summary.stdout)
    assert counts["batches_planned"] == 3
    assert counts["batches_done"] == 1
    # The toy hook rejects record 5 (5 kB); the other four pass and are published.
    assert (counts["records_passed"], counts["records_rejected"]) == (4, 1), summary.stdout
    assert counts["records_in_archive"] == 4

    records = osa("records", "--convention", "toy", "--limit", "3", "--features", "--json",
                  env=env, cwd=root, wrap=read_only)  # fmt: skip
    assert records.returncode == 0, records.stderr
    listed = json.loads(records.stdout)
    assert listed["truncated"] is True
    assert [r["source_id"] for r in listed["records"]] == sorted(TOY_IDS[:4])[:3]
    assert all(r["features"][0]["hook"] == "check_size" for r in listed["records"])
    assert records.stderr == "osa records: showing the first 3 of 4 records; --limit N shows more\n"
    # Without --features, features were not asked for: null, not an empty list.
    unasked = osa("records", "--json", env=env, cwd=root, wrap=read_only)
    assert unasked.returncode == 0, unasked.stderr
    listed = json.loads(unasked.stdout)
    assert (len(listed["records"]), listed["truncated"]) == (4, False)
    assert all(r["features"] is None for r in listed["records"])

    rejected = osa("rejections", "toy", "--json", env=env, cwd=root, wrap=read_only)
    assert rejected.returncode == 0, rejected.stderr
    rejections = json.loads(rejected.stdout)
    assert (rejections["convention"], rejections["truncated"]) == ("toy", False)
    [rejection] = rejections["rejections"]
    assert rejection["source_id"] == TOY_IDS[4]
    assert (rejection["status"], rejection["hook"]) == ("rejected", "check_size")
    assert rejection["partition"] == batch["partition"]
    assert rejection["reason"]

    dead = osa("dead-letters", "toy", "--json", env=env, cwd=root, wrap=read_only)
    assert dead.returncode == 0, dead.stderr
    assert json.loads(dead.stdout) == {"convention": "toy", "dead_letters": [], "truncated": False}
    assert tree(isolated_data_dir) == before


def test_our_definitions_build_without_beta_warnings_and_others_still_show(toy_conventions):
    from osa_dagster.definitions import build_definitions

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_definitions()

        # The same beta feature used by anyone else's code still warns.
        @dg.asset(backfill_policy=dg.BackfillPolicy.single_run())
        def someone_elses() -> None: ...

    beta = [w for w in caught if issubclass(w.category, dg.BetaWarning | dg.PreviewWarning)]
    assert [str(w.message).split(" is ")[0] for w in beta] == [
        "Parameter `backfill_policy` of function `asset`"
    ]


BAD_SETTINGS = [
    ({"OSA_HOOK_MEMORY": "toy.check_size=lots"}, "OSA_HOOK_MEMORY"),
    ({"OSA_HOOK_MEMORY": "toy.check_size=512:256"}, "OSA_HOOK_MEMORY"),
    ({"OSA_PARTITIONS_PER_RUN": "abc"}, "OSA_PARTITIONS_PER_RUN"),
    ({"OSA_PARTITIONS_PER_RUN": "0"}, "OSA_PARTITIONS_PER_RUN"),
    ({"OSA_EXECUTOR": "threads"}, "OSA_EXECUTOR"),
    ({"OSA_DATABASE_URL": "notaurl"}, "OSA_DATABASE_URL"),
    ({"OSA_DATABASE_URL": "nosuchdb://host/db"}, "OSA_DATABASE_URL"),
    # Port 9 (discard) refuses connections on 127.0.0.1.
    ({"OSA_DATABASE_URL": "postgresql://osa@127.0.0.1:9/records"}, "OSA_DATABASE_URL"),
    (
        {
            "OSA_STORAGE": "s3://osa-test/prefix",
            "OSA_S3_ENDPOINT_URL": "http://127.0.0.1:9",
            "OSA_S3_RETRY_ATTEMPTS": "1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
        },
        "OSA_S3_ENDPOINT_URL",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "variable"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it_and_creates_nothing(
    site, isolated_data_dir, setting, variable
):
    root, env = site
    isolated_data_dir.mkdir()
    before = tree(root)
    result = osa("summary", "toy", env=env | setting, cwd=root)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"osa summary: {variable}"), result.stderr
    assert tree(root) == before


@pytest.mark.slow
@pytest.mark.parametrize("command", [["materialize", "toy"], ["demo"], ["stack"]])
def test_hooks_without_their_promised_sandbox_are_refused_before_anything_runs(site, command):
    root, env = site
    no_tools = root / "no-tools"
    no_tools.mkdir()
    before = tree(root)
    # No bubblewrap on the PATH, and OSA_HOOK_SANDBOX unset: on, the default.
    result = osa(*command, env=env | {"PATH": str(no_tools)}, cwd=root)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(
        f"osa {command[0]}: OSA_HOOK_SANDBOX=on, but hooks cannot be sandboxed here: bwrap"
    )
    assert "install the Debian packages bubblewrap" in result.stderr
    assert "OSA_HOOK_SANDBOX=off" in result.stderr
    assert tree(root) == before  # no run, no data folder, no Dagster storage


def one_line_and_exit_2(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The one line a refused command printed on stderr, after checking it is one line."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"osa {command}: "), result.stderr
    return result.stderr.removeprefix(f"osa {command}: ").rstrip("\n")


BAD_ARGUMENTS = [
    (["records", "--limit", "-1"], "--limit: must be a positive number, not -1"),
    (["records", "--limit", "0"], "--limit: must be a positive number, not 0"),
    (
        ["plan", "toy", "--source", "bogus:/tmp"],
        "--source: toy: 'bogus:/tmp' is not one of its sources ['local'], nor a folder or "
        "file that exists",
    ),
    # The webserver named is nobody: a launch would fail otherwise (exit 1, another line).
    (
        ["backfill", "toy", "KEY", "--wait", "-3", "--url", "http://127.0.0.1:9"],
        "--wait: must be a positive number of seconds, not -3",
    ),
    (
        ["backfill", "toy", "KEY", "--wait", "nan", "--url", "http://127.0.0.1:9"],
        "--wait: must be a positive number of seconds, not nan",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arguments", "message"), BAD_ARGUMENTS)
def test_a_bad_argument_is_one_line_and_launches_nothing(
    site, isolated_data_dir, arguments, message
):
    root, env = site
    isolated_data_dir.mkdir()
    before = tree(root)
    result = osa(*arguments, env=env, cwd=root)
    assert one_line_and_exit_2(result, arguments[0]) == message
    assert result.stdout == ""
    # No run recorded (the instance's storage was never opened), nothing made.
    assert tree(root) == before


BAD_SETTINGS_FOR_A_PLAN = [
    # Taken for a relative folder, this would have made ./ftp:/x/y.
    ({"OSA_STORAGE": "ftp://x/y"}, "OSA_STORAGE='ftp://x/y': ftp:// is not a store"),
    ({"OSA_STORAGE": "s3://"}, "OSA_STORAGE='s3://': it must name a bucket"),
    ({"OSA_DEPOSITS": "gopher://x"}, "OSA_DEPOSITS='gopher://x': gopher:// is not a store"),
    ({"OSA_DOMAIN": "bad domain:/x"}, "OSA_DOMAIN='bad domain:/x': it goes into SRNs"),
    ({"OSA_PLAN_CRON_TOY": "not a cron"}, "OSA_PLAN_CRON_TOY='not a cron': not a cron"),
    ({"OSA_HOOK_LEDGER": "/proc/version"}, "OSA_HOOK_LEDGER='/proc/version': the ledger's"),
    ({"OSA_HOOK_LEDGER": "/dev/null"}, "OSA_HOOK_LEDGER='/dev/null': it exists and is not"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS_FOR_A_PLAN)
def test_a_bad_setting_stops_a_plan_before_its_run(site, setting, message):
    root, env = site
    before = tree(root)
    result = osa("plan", "toy", "--limit", "5", env=env | setting, cwd=root)
    assert one_line_and_exit_2(result, "plan").startswith(message)
    # No run recorded, no data folder, no store made.
    assert tree(root) == before


def runs(home: Path) -> list[str]:
    """The ids of the runs that the Dagster instance at `home` recorded."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return [run.run_id for run in instance.get_runs()]


@pytest.fixture
def ingested_site(site) -> tuple[Path, dict[str, str]]:
    """The site with two toy batches planned and ingested."""
    root, env = site
    planned = osa("plan", "toy", "--limit", "10", "--batch-size", "5", env=env, cwd=root)
    assert planned.returncode == 0, planned.stderr
    ingested = osa("materialize", "toy", env=env, cwd=root)
    assert ingested.returncode == 0, ingested.stderr
    return root, env


def garble(path: Path) -> None:
    """Overwrite the start of a file the way a bad disk or a stray write would."""
    with path.open("r+b") as file:
        file.write(b"garbage!" * 8)


@pytest.mark.slow
def test_a_garbled_manifest_is_one_line_and_launches_no_run(ingested_site, isolated_data_dir):
    root, env = ingested_site
    manifest = sorted((isolated_data_dir / "artifacts" / "manifests" / "toy").iterdir())[1]
    garble(manifest)
    recorded = runs(root / "home")

    result = osa("materialize", "toy", env=env, cwd=root)
    message = one_line_and_exit_2(result, "materialize")
    assert f"the manifest at {manifest} cannot be read" in message
    assert "osa plan toy --replan" in message
    assert runs(root / "home") == recorded

    debug = osa("materialize", "toy", "--debug", env=env, cwd=root)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert runs(root / "home") == recorded


@pytest.mark.slow
def test_a_garbled_records_database_is_one_line_naming_it(ingested_site, isolated_data_dir):
    root, env = ingested_site
    database = isolated_data_dir / "records.db"
    garble(database)
    recorded = runs(root / "home")
    for command in (["materialize", "toy"], ["summary", "toy"], ["records"]):
        result = osa(*command, env=env, cwd=root)
        assert one_line_and_exit_2(result, command[0]) == (
            f"OSA_DATA_DIR: the records database sqlite:///{database} cannot be used: "
            "file is not a database"
        )
    assert runs(root / "home") == recorded


@pytest.mark.slow
def test_a_garbled_dagster_database_is_named_as_the_instances(ingested_site):
    root, env = ingested_site
    runs_db = root / "home" / "history" / "runs.db"
    garble(runs_db)
    garbled = runs_db.read_bytes()
    for command in (["materialize", "toy"], ["plan", "toy"]):
        result = osa(*command, env=env, cwd=root)
        assert one_line_and_exit_2(result, command[0]) == (
            f"DAGSTER_HOME: the Dagster instance's database sqlite:///{runs_db} cannot be "
            "used: file is not a database"
        )
    assert runs_db.read_bytes() == garbled


@pytest.mark.slow
def test_an_operator_error_raised_inside_a_run_is_one_line(site, tmp_path):
    """OSA_HOOK_SANDBOX=on where bubblewrap cannot be found: the hook step raises
    SandboxUnavailable inside the run; the command says so in one line, or in full with
    --debug."""
    root, env = site
    planned = osa("plan", "toy", "--limit", "5", env=env, cwd=root)
    assert planned.returncode == 0, planned.stderr
    no_programs = tmp_path / "empty-bin"
    no_programs.mkdir()
    without_bwrap = env | {"OSA_HOOK_SANDBOX": "on", "PATH": str(no_programs)}

    result = osa("materialize", "toy", env=without_bwrap, cwd=root)
    assert "bwrap" in one_line_and_exit_2(result, "materialize")

    debug = osa("materialize", "toy", "--debug", env=without_bwrap, cwd=root)
    assert debug.returncode != 0
    assert "SandboxUnavailable" in debug.stderr
    assert "Traceback (most recent call last)" in debug.stderr


@pytest.mark.slow
def test_a_bug_inside_a_run_is_a_failure_with_its_traceback_under_debug(site):
    root, env = site
    env = env | {"OSA_CONVENTIONS": f"{env['OSA_CONVENTIONS']},tests.fixtures.buggy_convention"}
    result = osa("plan", "buggy", env=env, cwd=root)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("osa plan: planning buggy failed (run "), line
    assert line.endswith(
        "buggy_plan_batches failed: ZeroDivisionError: integer division or modulo by zero"
    )
    assert "Traceback" not in result.stderr

    debug = osa("plan", "buggy", "--debug", env=env, cwd=root)
    assert debug.returncode == 1
    assert "ZeroDivisionError" in debug.stderr
    assert "pages = 10 // records_per_page" in debug.stderr


@pytest.mark.parametrize(
    ("partitions", "per_run", "runs_at_once", "size"),
    [
        (12, 20, 1, 12),
        (40, 20, 1, 20),
        (12, 20, 2, 6),
        (115, 20, 2, 20),
        (5, 20, 2, 3),
        (1, 20, 4, 1),
    ],
)
def test_runs_at_once_share_the_partitions(partitions, per_run, runs_at_once, size):
    from osa_dagster.cli import run_size

    assert run_size(partitions, per_run, runs_at_once) == size


@pytest.mark.slow
def test_runs_at_once_each_run_in_a_worker_process_and_every_batch_once(site):
    """OSA_RUNS_AT_ONCE=2 over four batches: two runs of two, executed by worker processes
    (not the command's own), every batch ingested once, a line per run."""
    root, env = site
    planned = osa("plan", "toy", "--limit", "20", "--batch-size", "5", env=env, cwd=root)
    assert planned.returncode == 0, planned.stderr
    command = [sys.executable, "-m", "osa_dagster.cli", "materialize", "toy"]
    with subprocess.Popen(
        command, env=env | {"OSA_RUNS_AT_ONCE": "2"}, cwd=root, stdout=subprocess.PIPE, text=True
    ) as process:
        stdout, _ = process.communicate(timeout=600)
    assert process.returncode == 0, stdout
    lines = [line for line in stdout.splitlines() if line.startswith("[")]
    assert sorted(line[:5] for line in lines) == ["[2/4]", "[4/4]"], stdout
    assert all(line.endswith(" s)") and "(2 batches): ok" in line for line in lines), stdout

    with dg.DagsterInstance.from_config(str(root / "home")) as instance:
        ingest_runs = [r for r in instance.get_runs() if r.job_name == "toy_ingest"]
        features = instance.get_materialized_partitions(dg.AssetKey(["toy", "features"]))
        keys = instance.get_dynamic_partitions("toy_batches")
        events = instance.fetch_materializations(
            dg.AssetKey(["toy", "raw_batch"]), limit=100
        ).records
    assert len(ingest_runs) == 2
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in ingest_runs)
    workers = {ProcessIdentity.model_validate_json(r.tags[WORKER_TAG]).pid for r in ingest_runs}
    assert process.pid not in workers
    assert features == set(keys) and len(keys) == 4
    assert sorted(e.partition_key for e in events) == sorted(keys)


@pytest.mark.slow
def test_a_run_refused_in_a_worker_process_is_one_line(site, tmp_path):
    """The operator error of test_an_operator_error_raised_inside_a_run_is_one_line, raised in
    a worker process with runs at once, reaches the command as the same one line."""
    root, env = site
    planned = osa("plan", "toy", "--limit", "10", "--batch-size", "5", env=env, cwd=root)
    assert planned.returncode == 0, planned.stderr
    no_programs = tmp_path / "empty-bin"
    no_programs.mkdir()
    without_bwrap = env | {
        "OSA_HOOK_SANDBOX": "on",
        "PATH": str(no_programs),
        "OSA_RUNS_AT_ONCE": "2",
    }
    result = osa("materialize", "toy", env=without_bwrap, cwd=root)
    assert "bwrap" in one_line_and_exit_2(result, "materialize")
