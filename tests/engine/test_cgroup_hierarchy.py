"""Which cgroup hierarchy limits the orchestrator, and the memory budget it leaves, read from
made-up /proc and /sys trees of each kind of host (test_cgroup_kernel.py reads real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from osa_dagster.engine.capacity import default_budget_mb
from osa_dagster.engine.cgroup import memory_hierarchy, memory_limit_bytes

MB = 1024 * 1024
HOST_MB = 16384
V1_UNLIMITED = "9223372036854771712"


def host(root: Path, proc_cgroup: str, files: dict[str, str]) -> Path:
    """A made-up machine of HOST_MB under `root`: /proc/self/cgroup, /proc/meminfo, and
    /sys/fs/cgroup/<path> = text for each of `files`."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(proc_cgroup)
    (root / "proc/meminfo").write_text(f"MemTotal:       {HOST_MB * 1024} kB\nMemFree: 1 kB\n")
    for path, text in files.items():
        file = root / "sys/fs/cgroup" / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    return root


def v2_host(root: Path, limits: dict[str, str]) -> Path:
    files = {"cgroup.controllers": "cpu io memory pids\n"}
    files |= {f"{group}/memory.max": f"{limit}\n" for group, limit in limits.items()}
    return host(root, "0::/user.slice/user-1000.slice/session-3.scope\n", files)


def test_cgroup_v2_the_smallest_limit_on_the_way_to_the_root_applies(tmp_path: Path) -> None:
    # The session's own cgroup has no limit; the user's slice above it does, and the slice
    # above that a larger one. The root cgroup has no memory.max at all.
    root = v2_host(
        tmp_path,
        {
            "user.slice": str(3072 * MB),
            "user.slice/user-1000.slice": str(2048 * MB),
            "user.slice/user-1000.slice/session-3.scope": "max",
        },
    )

    found = memory_hierarchy(root)

    assert (found.version, found.group) == (
        2,
        root / "sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope",
    )
    assert memory_limit_bytes(root) == 2048 * MB
    assert default_budget_mb(root=root) == int(2048 * 0.8)


def test_cgroup_v2_without_any_limit_the_host_memory_applies(tmp_path: Path) -> None:
    root = v2_host(tmp_path, {"user.slice": "max", "user.slice/user-1000.slice": "max"})

    assert memory_limit_bytes(root) is None
    assert default_budget_mb(root=root) == int(HOST_MB * 0.8)


def test_a_limit_above_the_host_memory_leaves_the_host_memory(tmp_path: Path) -> None:
    root = v2_host(tmp_path, {"user.slice": str(4 * HOST_MB * MB)})

    assert default_budget_mb(root=root) == int(HOST_MB * 0.8)


def test_cgroup_v1_reads_the_memory_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    proc_cgroup = "12:pids:/jobs/7\n4:memory:/jobs/7\n1:name=systemd:/jobs/7\n"
    root = host(
        tmp_path,
        proc_cgroup,
        {
            "memory/memory.limit_in_bytes": V1_UNLIMITED,
            "memory/jobs/memory.limit_in_bytes": str(1024 * MB),
            "memory/jobs/7/memory.limit_in_bytes": V1_UNLIMITED,
        },
    )

    found = memory_hierarchy(root)

    assert (found.version, found.group) == (1, root / "sys/fs/cgroup/memory/jobs/7")
    assert memory_limit_bytes(root) == 1024 * MB
    assert default_budget_mb(root=root) == int(1024 * 0.8)


def test_a_hybrid_host_uses_cgroup_v1_where_the_memory_controller_is(tmp_path: Path) -> None:
    proc_cgroup = "4:memory:/jobs/7\n0::/jobs/7\n"
    root = host(
        tmp_path,
        proc_cgroup,
        {
            "memory/jobs/7/memory.limit_in_bytes": str(512 * MB),
            # cgroup v2 mounted beside v1, without the memory controller.
            "unified/cgroup.controllers": "\n",
        },
    )

    found = memory_hierarchy(root)

    assert found.version == 1
    assert "hybrid" in found.reason
    assert memory_limit_bytes(root) == 512 * MB


@pytest.mark.parametrize(
    ("proc_cgroup", "controllers", "why"),
    [
        ("0::/jobs/7\n", "cpu io pids\n", "without the memory controller"),
        ("", "", "no cgroup memory controller"),
    ],
)
def test_no_memory_controller_is_said_and_the_host_memory_applies(
    tmp_path: Path, proc_cgroup: str, controllers: str, why: str
) -> None:
    root = host(tmp_path, proc_cgroup, {"cgroup.controllers": controllers})

    found = memory_hierarchy(root)

    assert found.version is None
    assert why in found.reason
    assert default_budget_mb(root=root) == int(HOST_MB * 0.8)
