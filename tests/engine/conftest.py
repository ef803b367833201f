from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.engine import LocalRunner
from osa_dagster.engine.cgroup import NAME_PREFIX, MemoryLimitsUnavailable, attempt_cgroups
from osa_dagster.settings import Settings

from .helpers import Harness


@pytest.fixture(autouse=True)
def unsandboxed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests watch hooks from outside (pid files, ledgers in the test's folder), which a
    sandboxed hook cannot write: they test the engine, and test_sandbox.py the sandbox."""
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")


@pytest.fixture(autouse=True)
def no_cgroup_left() -> Iterator[None]:
    """Every test must remove the cgroups it made (named after this process)."""
    yield
    try:
        cgroups = attempt_cgroups()
    except MemoryLimitsUnavailable:
        return
    for parent in (cgroups.parent, cgroups.pids_parent):
        if parent is not None:
            assert list(parent.glob(f"{NAME_PREFIX}{os.getpid()}-*")) == []


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path, LocalRunner.from_settings(Settings.from_env()))
