"""The disk of the artifact store fills up while a hook writes its outputs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.fault_convention import record_ids
from tests.fixtures.services import unavailable

from .conftest import (
    check_results,
    failed_steps,
    feature_rows,
    ingest,
    plan,
    published,
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs; the test grows it with `mount -o remount,size=...`."""
    mountpoint = tmp_path / "store"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.slow
def test_disk_full_fails_the_hook_step_cleanly_then_rerun_completes(
    instance, small_disk: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_STORAGE", str(small_disk))
    monkeypatch.setenv("OSA_FAULTS_FEATURE_KB", "200")  # 20 records x 200 kB > 1 MB
    ids = record_ids(20)
    [key] = plan(instance, "faults_bulky")

    result = ingest(instance, "faults_bulky", key)

    assert not result.success
    failures = failed_steps(result)
    assert list(failures) == ["faults_bulky__hook_outcomes"], failures
    assert "No space left on device" in failures["faults_bulky__hook_outcomes"]
    assert published("faults_bulky") == {}

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = ingest(instance, "faults_bulky", key)

    assert result.success, failed_steps(result)
    assert published("faults_bulky") == dict.fromkeys(ids, 1)
    assert feature_rows() == 20
    assert all(check_results(result).values()), check_results(result)
