"""Two step containers of the Docker executor share one data folder, and so one capacity
ledger, each in a pid namespace of its own: neither may take the other's holder for dead.

Both containers run the step image with this checkout's code mounted over the image's,
under the host's own host name (the worst case: same host, same boot, another pid
namespace, where a pid names another process). Each holds an admission and, for every line
it reads, says which entries the ledger holds for it."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.engine.capacity import HookCapacity
from tests.engine.helpers import eventually

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import json, sys
from pathlib import Path
from osa_dagster.engine.capacity import HookCapacity
capacity = HookCapacity(Path(sys.argv[1]), slots=4, budget_mb=100, heartbeat_s=0.2)
with capacity.admit(10, sys.argv[2]):
    print("admitted", flush=True)
    for _ in sys.stdin:
        print(json.dumps(sorted(e.label for e in capacity.read().entries)), flush=True)
"""


class StepContainer:
    """A container of the step image holding an admission in the shared ledger."""

    def __init__(self, image: str, shared: Path, label: str) -> None:
        self.name = f"osa-test-ledger-{label}-{secrets.token_hex(4)}"
        self.label = label
        self._process = subprocess.Popen(
            [
                "docker",
                "run",
                "--rm",
                "-i",
                f"--name={self.name}",
                "--network=none",
                f"--hostname={socket.gethostname()}",
                f"--volume={shared}:{shared}",
                f"--volume={REPO}:/checkout:ro",
                "--env=PYTHONPATH=/checkout:/checkout/sdk/src",
                image,
                "python",
                "-c",
                HOLDER,
                str(shared / "hook-capacity.json"),
                label,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        assert self._process.stdout.readline() == "admitted\n"

    def labels_seen(self) -> list[str]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write("read\n")
        self._process.stdin.flush()
        return json.loads(self._process.stdout.readline())

    def release(self) -> None:
        """Close its input: it leaves the ledger and ends."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        assert self._process.wait(timeout=120) == 0

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "--force", self.name], capture_output=True, check=False)
        self._process.kill()
        self._process.wait()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The data folder both containers mount at the same path."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


@pytest.fixture
def containers() -> Iterator[list[StepContainer]]:
    started: list[StepContainer] = []
    yield started
    for container in started:
        container.remove()


def test_step_containers_sharing_a_ledger_keep_each_others_holders(
    step_image: str,
    shared: Path,
    containers: list[StepContainer],
) -> None:
    first = StepContainer(step_image, shared, "first")
    containers.append(first)
    second = StepContainer(step_image, shared, "second")
    containers.append(second)

    # Each reads the ledger (and would drop what it took for dead): both entries stay.
    assert first.labels_seen() == ["first", "second"]
    assert second.labels_seen() == ["first", "second"]
    assert first.labels_seen() == ["first", "second"]
    # This process, in a third pid namespace, cannot check them either, and keeps them.
    here = HookCapacity(shared / "hook-capacity.json", slots=4, budget_mb=100)
    entries = here.read().entries
    assert {e.label for e in entries} == {"first", "second"}
    assert {e.holder.alive() for e in entries} == {None}
    assert len({e.holder.pid_namespace for e in entries}) == 2

    # A holder that leaves takes its entry with it, and the other sees it go.
    first.release()
    assert second.labels_seen() == ["second"]
    # One that dies unseen is dropped once its heartbeat is older than the bound.
    second.remove()
    impatient = HookCapacity(
        shared / "hook-capacity.json", slots=4, budget_mb=100, unseen_holder_ttl_s=0.5
    )
    assert eventually(lambda: impatient.read().entries == [], timeout_s=30)
