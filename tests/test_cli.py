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
