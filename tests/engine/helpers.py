"""Shared pieces of the engine tests: the test hooks, records, and a harness around run_hook."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osa_sdk.contract import OUTPUT_FILES, files_dir_for
from osa_sdk.types import HookRecord, HookRecordId

from osa_dagster.engine import (
    AttemptOptions,
    Checkpoint,
    FileCheckpointIO,
    HookBatch,
    HookProgress,
    HookSpec,
    Invocation,
    LocalRunner,
    MemoryHistoryIO,
    MemoryPolicy,
    advance_hook,
    run_hook,
)
from osa_dagster.engine.cgroup import MemoryLimitsUnavailable, attempt_cgroups
from osa_dagster.engine.runners.sandbox import SandboxPolicy, SandboxUnavailable, find_sandbox
from osa_dagster.settings import settings
from tests.fixtures.services import unavailable

HOOKS = Path(__file__).parent / "hooks"
BEHAVE = (sys.executable, str(HOOKS / "behave.py"))
RAW_OUTPUT = (sys.executable, str(HOOKS / "raw_output.py"))
SHELL_HOOK = ("sh", str(HOOKS / "shell_hook.sh"))
POLL_S = 0.05


def require_cgroups() -> None:
    """Skip without a usable cgroup (v1 or v2); on CI, fail: OOM tests must run there."""
    try:
        attempt_cgroups(settings().cgroup_parent)
    except MemoryLimitsUnavailable as missing:
        unavailable(str(missing))


def require_sandbox() -> None:
    """Skip where hooks cannot be sandboxed (no bubblewrap, user namespaces closed); on CI,
    fail: the sandbox is on by default, so its tests must run there."""
    try:
        find_sandbox(SandboxPolicy())
    except SandboxUnavailable as reason:
        unavailable(str(reason))


def alive(pid: int) -> bool:
    """Running, or stopped; a zombie counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def invocation(
    tmp_path: Path, *command: str, memory_mb: int = 128, timeout_s: float = 120.0
) -> Invocation:
    return Invocation(
        command=command,
        env={"OSA_IN": str(tmp_path)},
        in_dir=tmp_path,
        out_dir=tmp_path,
        files_root=tmp_path,
        memory_limit_mb=memory_mb,
        timeout_s=timeout_s,
        log_path=tmp_path / "hook.log",
    )


def record(record_id: str, size_mb: float = 1.0, **metadata: Any) -> HookRecord:
    return HookRecord(
        id=HookRecordId(record_id),
        files_dir=files_dir_for(record_id),
        metadata=metadata,
        size_mb=size_mb,
    )


@dataclass
class Harness:
    """One batch folder: files, a checkpoint file, a work dir and the hooks' ledger."""

    root: Path
    runner: LocalRunner

    @property
    def files_root(self) -> Path:
        return self.root / "files"

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.txt"

    @property
    def checkpoints(self) -> FileCheckpointIO:
        return FileCheckpointIO(self.root / "checkpoint.json")

    def spec(
        self,
        command: tuple[str, ...] = BEHAVE,
        *,
        base_mb: int = 128,
        cap_mb: int = 512,
        timeout_s: float = 60.0,
        memory: dict[str, Any] | None = None,
        **config: Any,
    ) -> HookSpec:
        return HookSpec(
            name="test_hook",
            command=command,
            memory=MemoryPolicy(base_mb=base_mb, cap_mb=cap_mb, **(memory or {})),
            timeout_s=timeout_s,
            config={"ledger": str(self.ledger), "once_file": str(self.root / "once"), **config},
        )

    def batch(self, records: list[HookRecord]) -> HookBatch:
        return HookBatch(records=records, files_root=self.files_root)

    def run(
        self,
        spec: HookSpec,
        records: list[HookRecord],
        *,
        history: MemoryHistoryIO | None = None,
    ) -> Checkpoint:
        return run_hook(
            spec,
            self.batch(records),
            self.runner,
            self.checkpoints,
            self.workdir,
            AttemptOptions(checkpoint_every_s=POLL_S),
            history=history,
        )

    def advance(
        self,
        spec: HookSpec,
        records: list[HookRecord],
        *,
        history: MemoryHistoryIO | None = None,
    ) -> HookProgress:
        return advance_hook(
            spec,
            self.batch(records),
            self.runner,
            self.checkpoints,
            self.workdir,
            AttemptOptions(checkpoint_every_s=POLL_S),
            history=history,
        )

    def ledger_counts(self) -> Counter[str]:
        if not self.ledger.exists():
            return Counter()
        return Counter(self.ledger.read_text().split("\n")[:-1])

    def outcome_lines(self) -> Counter[str]:
        """How many outcome lines the hook wrote per record id, over every attempt."""
        ids: Counter[str] = Counter()
        for name in OUTPUT_FILES:
            for path in self.workdir.glob(f"attempt-*/out/{name}"):
                ids.update(json.loads(line)["id"] for line in path.read_text().splitlines())
        return ids
