"""Every command the README shows runs as written, against a throwaway instance and data
folder: `DAGSTER_HOME` and `OSA_DATA_DIR` point at them, which the README's commands honour.

A command the README gains must be added here (run, or named with the test that runs it):
the first test fails otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from osa_dagster.conventions.pdb.ingester import mirror_entries
from tests.conftest import REPO
from tests.fixtures.services import unavailable
from tests.test_pdb_end_to_end import MIRROR, expected_publishable
from tests.ui.conftest import free_port

README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
# What the README's commands look like (perhaps after a variable's assignment); anything
# else in backquotes is not a command.
COMMAND = re.compile(r"^(OSA_\w+=\S+ )?(\.venv/bin/|dagster |osa |make|dg )")

# Run by test_the_documented_commands_run_as_written, in this order (KEY and [PARTITION ...]
# are filled in with batches the first command planned).
RUN_HERE = (
    ".venv/bin/osa plan pdb --limit 12 --batch-size 4",
    ".venv/bin/osa materialize pdb [PARTITION ...]",
    ".venv/bin/dagster asset materialize -m osa_dagster.definitions --select group:pdb "
    "--partition KEY",
    ".venv/bin/dg launch --assets group:pdb --partition KEY",
    ".venv/bin/osa records --convention pdb --features",
    ".venv/bin/osa records --convention pdb --provenance",
    ".venv/bin/osa versions pdb",
    ".venv/bin/osa materialize pdb --stale --dry-run",
    ".venv/bin/osa materialize pdb --stale",
    ".venv/bin/osa summary pdb",
    ".venv/bin/osa rejections pdb [PARTITION ...]",
    ".venv/bin/osa dead-letters pdb",
    "OSA_HOOK_MEMORY=pdb.extract_features=192:8192 .venv/bin/osa materialize pdb --dead-letters",
    ".venv/bin/osa db upgrade",
    ".venv/bin/osa db current",
    "dagster instance concurrency set osa_hooks 8",
    ".venv/bin/dg check defs",
    ".venv/bin/dg list defs",
)
# Run by other tests, or only by hand, and why.
RUN_ELSEWHERE = {
    "make demo": "test_make_demo_runs_quietly, below",
    "osa demo": "tests/test_cli.py refuses it without the sandbox; `make demo` runs it",
    ".venv/bin/dg dev": "test_dg_dev_serves_the_code_location_under_its_one_name, below",
    "make ui": "tests/ui/test_backfills.py starts `make ui PORT=...`",
    "make ui PORT=3001": "tests/ui/test_backfills.py starts `make ui PORT=...`",
    ".venv/bin/dagster job backfill -m osa_dagster.definitions -j pdb_ingest "
    "--partitions KEY1,KEY2 --noprompt": "tests/ui/test_backfills.py, under `make ui`",
    "osa backfill pdb --failed": "tests/ui/test_backfills.py, under `make ui`",
    "osa backfill pdb KEY1 KEY2": "tests/ui/test_backfills.py runs the same launch by range",
    "osa backfill pdb --from KEY --to KEY": "tests/ui/test_backfills.py, under `make ui`",
    "make demo-s3": "the demo on SeaweedFS; its store is tested in tests/storage",
    "make images": "CI runs it before `make test`",
    "make test": "CI runs it; it runs this test",
    "make test-cgroup2": "CI runs it after `make test`: tests/engine/test_cgroup_kernel.py in "
    "a cgroup v2 guest",
    "make demo-cgroup2": "the demo in a cgroup v2 guest, by hand: minutes under emulation",
    "make k8s-check ARGS=...": "needs a real Kubernetes cluster",
    "make bench": "benchmarks, run by hand (bench/RESULTS.md)",
    "OSA_CONVENTIONS=mylab.conventions make ui": "a user's module; tests load "
    "tests.fixtures.toy_convention the same way",
    ".venv/bin/osa stack": "tests/storage/test_stack.py runs it, with --dir and --port",
    ".venv/bin/osa plan pdb --dry-run": "tests/test_upstream_end_to_end.py runs it (with "
    "--json) on a copy of the bundled mirror changed upstream",
    "make stack": "runs `osa stack`, which tests/storage/test_stack.py runs",
}
# Backquoted text that names a command without being one to run.
MENTIONS = {
    "make",
    "dagster dev",
    "osa backfill",
    "osa materialize",
    "osa plan",
    "osa stack",
    "osa plan: --limit: must be a positive number of records, not 0",
    "osa summary: OSA_PARTITIONS_PER_RUN='abc': ...",
}
BENCHMARKS = re.compile(r"^\.venv/bin/python bench/\w+\.py( --[\w-]+ \w+)*$")
BETA_WARNING = re.compile(r"BetaWarning|PreviewWarning")


def documented_commands() -> list[str]:
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))
    return list(dict.fromkeys(s for s in spans if COMMAND.match(s)))


def test_every_documented_command_is_run_by_a_test():
    known = {*RUN_HERE, *RUN_ELSEWHERE, *MENTIONS}
    unknown = [c for c in documented_commands() if c not in known and not BENCHMARKS.match(c)]
    assert unknown == [], "README commands no test runs: add them to tests/test_readme.py"
    # And nothing here is stale: each command is still in the README as written.
    documented = set(documented_commands())
    assert [c for c in known if c not in documented] == []


@dataclass(frozen=True)
class Shell:
    """Runs README commands as a person would, in the repository, against its own instance."""

    home: Path
    data: Path
    env: dict[str, str]

    def run(self, command: str, timeout_s: float = 900.0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert result.returncode == 0, (
            f"{command} exited {result.returncode}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result


@pytest.fixture
def shell(tmp_path: Path) -> Shell:
    if not (VENV_BIN / "osa").is_file():
        unavailable(f"no {VENV_BIN}/osa: the README's commands need `make` to have made .venv")
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSA_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(home),
        "OSA_DATA_DIR": str(data),
        # An activated .venv, for the commands the README writes without .venv/bin/.
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV_BIN.parent),
    }
    return Shell(home=home, data=data, env=env)


@pytest.mark.slow
def test_the_documented_commands_run_as_written(shell: Shell):
    outputs: dict[str, subprocess.CompletedProcess[str]] = {}
    planned = shell.run(RUN_HERE[0])
    keys = [line.split()[0] for line in planned.stdout.splitlines()]
    assert planned.stdout.splitlines() == [f"{key}  4  new" for key in keys]
    assert len(keys) == 3
    batch_for = {  # each way of running a batch runs another one
        RUN_HERE[1]: keys[0],
        RUN_HERE[2]: keys[1],
        RUN_HERE[3]: keys[2],
        # The damaged 1OSM is in the third batch of the mirror's first twelve entries.
        ".venv/bin/osa rejections pdb [PARTITION ...]": keys[2],
    }
    for command in RUN_HERE[1:]:
        key = batch_for.get(command, keys[0])
        written = command.replace("[PARTITION ...]", key).replace("KEY", key)
        outputs[command] = shell.run(written)

    for command in (RUN_HERE[0], RUN_HERE[1]):
        both = outputs.get(command, planned)
        assert not BETA_WARNING.search(both.stdout + both.stderr), command

    expected = {
        pdb_id for pdb_id, path in mirror_entries(MIRROR)[:12] if expected_publishable(path)
    }
    listed = outputs[".venv/bin/osa records --convention pdb --features"].stdout
    assert {line.split()[2] for line in listed.splitlines() if line.startswith("urn:")} == expected
    summary = outputs[".venv/bin/osa summary pdb"].stdout
    assert re.search(r"^batches done +3$", summary, re.M), summary
    assert re.search(rf"^records in the archive +{len(expected)}$", summary, re.M), summary
    # The damaged 1OSM among the first twelve is rejected, with its reason.
    rejections = outputs[".venv/bin/osa rejections pdb [PARTITION ...]"].stdout
    assert "1OSM" in rejections and "rejected: " in rejections
    assert outputs[".venv/bin/osa dead-letters pdb"].stdout == "pdb has no dead letters\n"
    dead_letters = next(c for c in RUN_HERE if c.endswith("--dead-letters"))
    assert outputs[dead_letters].stdout == "pdb has no dead letters: nothing to run\n"
    # Every batch was judged by the hooks' current versions: re-validation has nothing to do.
    stale = outputs[".venv/bin/osa materialize pdb --stale"].stdout
    assert stale == "every hook of pdb has judged every batch: nothing to run\n"
    assert "All definitions loaded successfully." in outputs[".venv/bin/dg check defs"].stdout
    assert "pdb/raw_batch" in outputs[".venv/bin/dg list defs"].stdout


@pytest.mark.slow
def test_make_demo_runs_quietly(shell: Shell):
    demo = shell.run("make demo", timeout_s=1800)
    assert "records passed every hook" in demo.stdout
    assert not BETA_WARNING.search(demo.stdout + demo.stderr)


@pytest.fixture
def dg_dev(shell: Shell) -> Iterator[str]:
    """`.venv/bin/dg dev` on a free port (3000 may be someone's); its URL once it answers."""
    port = free_port()
    log = shell.home / "dg-dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f".venv/bin/dg dev -p {port}"],
            cwd=REPO,
            env=shell.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        # Whatever of its group did not stop on SIGTERM (its code servers may linger).
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow
def test_dg_dev_serves_the_code_location_under_its_one_name(dg_dev: str, shell: Shell):
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"
    answer = requests.post(f"{dg_dev}/graphql", json={"query": query}, timeout=60).json()
    entries = answer["data"]["workspaceOrError"]["locationEntries"]
    # The name `-m osa_dagster.definitions` and workspace.yaml give it: a job backfill
    # launched with -m is run by this daemon.
    assert [entry["name"] for entry in entries] == ["osa_dagster.definitions"], json.dumps(answer)
    # Loading our definitions warns of no beta or preview feature.
    log = (shell.home / "dg-dev.log").read_text()
    assert not BETA_WARNING.search(log), log
