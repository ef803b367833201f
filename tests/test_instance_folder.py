"""One instance and one data folder, whichever folder a command starts in.

The shipped embedded profile (dagster.yaml) is copied to DAGSTER_HOME, as the README says;
`osa plan` runs in one folder, then the README's `dagster asset materialize` runs one batch
from another and `dg launch` the other batch from the project's folder. Both must find the
batches the plan made (a second instance would not know their partitions) and the CLI, from
yet another folder, the records they published. With OSA_DATA_DIR unset the data folder is
$DAGSTER_HOME/.data, wherever the commands start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.settings import Settings, data_dir
from tests.conftest import REPO
from tests.ui.conftest import FOREIGN_SETTINGS

BIN = Path(sys.executable).parent


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} in {cwd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("data_dir_set", [True, False], ids=["OSA_DATA_DIR", "DAGSTER_HOME"])
def test_cli_dagster_and_dg_share_the_instance_from_any_folder(
    tmp_path: Path, data_dir_set: bool, monkeypatch: pytest.MonkeyPatch
):
    home, planned_in, elsewhere = tmp_path / "home", tmp_path / "site", tmp_path / "elsewhere"
    for folder in (home, planned_in, elsewhere):
        folder.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if k not in (*FOREIGN_SETTINGS, "OSA_DATA_DIR")}
    env |= {
        "DAGSTER_HOME": str(home),
        "OSA_CONVENTIONS": "tests.fixtures.toy_convention",
        "OSA_HOOK_SANDBOX": "off",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    }
    data = tmp_path / "data" if data_dir_set else home / ".data"
    if data_dir_set:
        env["OSA_DATA_DIR"] = str(data)

    plan = [str(BIN / "osa"), "plan", "toy", "--limit", "4", "--batch-size", "2", "--json"]
    planned = json.loads(run(plan, env, planned_in).stdout)
    first, second = (batch["partition"] for batch in planned["batches"])
    materialize = ["asset", "materialize", "-m", "osa_dagster.definitions", "--select"]
    run([str(BIN / "dagster"), *materialize, "group:toy", "--partition", first], env, elsewhere)
    run([str(BIN / "dg"), "launch", "--assets", "group:toy", "--partition", second], env, REPO)
    summary = json.loads(run([str(BIN / "osa"), "summary", "toy", "--json"], env, elsewhere).stdout)

    assert summary["batches_done"] == 2, summary
    # This process reads the instance as the commands did.
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("OSA_DATA_DIR")
    if data_dir_set:
        monkeypatch.setenv("OSA_DATA_DIR", str(data))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        features = dg.AssetKey(["toy", "features"])
        assert instance.get_materialized_partitions(features) == {first, second}
    assert (data / "dagster" / "storage").is_dir()
    assert (data / "records.db").is_file()
    # No second instance or data folder where the commands ran.
    for folder in (planned_in, elsewhere, home if data_dir_set else planned_in):
        assert not (folder / ".data").exists(), folder
    assert sorted(p.name for p in planned_in.iterdir()) == []
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_the_data_folder_is_in_dagster_home_unless_osa_data_dir_names_one(tmp_path: Path):
    home, data = tmp_path / "home", tmp_path / "data"
    assert Settings.from_env({"DAGSTER_HOME": str(home)}).data_dir == home / ".data"
    both = {"DAGSTER_HOME": str(home), "OSA_DATA_DIR": str(data)}
    assert Settings.from_env(both).data_dir == data
    assert Settings.from_env({}).data_dir == Path(".data").resolve()
    assert data_dir({"DAGSTER_HOME": str(home)}) == home / ".data"
