"""What a hook is to the engine: its command, its memory ladder, its limits."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MemoryPolicy(BaseModel):
    """The memory ladder of one hook: base, base*factor, base*factor^2, ..., and the cap last.

    The ladder climbs only on a real OOM kill, one rung per OOM, and always ends at the cap:
    a hook's cap is a limit its records really get. An OOM at the cap does not give up on the
    records left: with `isolate_poison`, the record the hook was on is run alone at the cap,
    and is errored as poison only if it runs out of memory alone; the others go on at the
    cap. `max_isolation_attempts` bounds those lone runs per limit, so a batch of many
    too-big records cannot run for ever; past it, what is left is errored.
    """

    model_config = ConfigDict(frozen=True)

    base_mb: int = Field(default=1024, gt=0)
    factor: float = Field(default=2.0, gt=1.0)
    cap_mb: int = Field(default=8192, gt=0)
    isolate_poison: bool = True
    max_isolation_attempts: int = Field(default=10, ge=0)

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> MemoryPolicy:
        if self.cap_mb < self.base_mb:
            raise ValueError(f"memory cap {self.cap_mb} MB is below the base {self.base_mb} MB")
        return self

    def ladder(self) -> list[int]:
        """Every limit an attempt may get, in order: [1024, 2048, 4096, 8192] by default;
        base 192 and cap 4096 give [192, 384, 768, 1536, 3072, 4096]."""
        limits = [self.base_mb]
        while limits[-1] < self.cap_mb:
            # At least 1 MB up, so that a small base and a factor near 1 still climb.
            climbed = max(int(limits[-1] * self.factor), limits[-1] + 1)
            limits.append(min(climbed, self.cap_mb))
        return limits

    def climbs(self) -> int:
        """How many OOMs can raise the limit: each retry of a hook step is one of them."""
        return len(self.ladder()) - 1

    def next_after(self, limit_mb: int) -> int | None:
        """The limit after an OOM at `limit_mb`, or None when the ladder is exhausted."""
        higher = [m for m in self.ladder() if m > limit_mb]
        return higher[0] if higher else None


# A version names folders of the store: letters, digits, '.', '_' and '-' only.
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SDK_RUNNER = ("-m", "osa_sdk", "hook")


class HookSpec(BaseModel):
    """One hook of a convention, as the engine runs it.

    `command` runs the hook under the container contract (for SDK hooks:
    ``python -m osa_sdk hook pkg.module:function``); `image` is used by container runners.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    command: tuple[str, ...] = Field(min_length=1)
    image: str | None = None
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)
    timeout_s: float = Field(default=3600.0, gt=0)
    config: dict[str, Any] = Field(default_factory=dict)
    emits_features: bool = False
    # What one attempt may write to its output folder, in decimal MB: past it the attempt is
    # stopped and the records it left are errored.
    max_output_mb: float = Field(default=512.0, gt=0)
    # Sandboxed runners give an attempt no network unless its hook asks for it here.
    network: bool = False
    version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    """What the hook's judgement is, named by its author ("2", "2026-12-strict"); None:
    derived from what it runs (see `hook_version`)."""


def sdk_hook_command(target: str) -> tuple[str, ...]:
    """The command that runs an SDK hook function ("pkg.module:function") under the contract,
    with this interpreter, so the hook sees the same installed packages."""
    return (sys.executable, "-m", "osa_sdk", "hook", target)


def _sdk_target(command: tuple[str, ...]) -> str | None:
    """The "pkg.module:function" an SDK hook command runs, or None for another command."""
    if len(command) == 5 and command[1:4] == _SDK_RUNNER:
        return command[4]
    return None


def _module_source(target: str) -> bytes:
    """The source of the module an SDK hook lives in (b"" when it has no file)."""
    module_name = target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not found.has_location:
        return b""
    return Path(found.origin).read_bytes()


def hook_version(spec: HookSpec) -> str:
    """The version of what the hook judges with: `spec.version` if declared, otherwise a
    digest of what changes its results. For an SDK hook, its function's name, the source
    of its module and its config (not the interpreter's path, which differs between a host
    and a container); for another command, the command, its image reference (a digest when
    pinned as name@sha256:...) and its config. Memory policy, limits and timeouts are left
    out: they change whether a record finishes, not how it is judged. A change in a module
    the hook's module imports is not seen: declare `version` for that."""
    if spec.version is not None:
        return spec.version
    target = _sdk_target(spec.command)
    judged: dict[str, Any] = {"config": spec.config, "features": spec.emits_features}
    if target is not None:
        judged["target"] = target
    else:
        judged.update(command=list(spec.command), image=spec.image)
    digest = hashlib.sha256(json.dumps(judged, sort_keys=True, default=str).encode())
    if target is not None:
        digest.update(_module_source(target))
    prefix = "src" if target is not None else "cmd"
    return f"{prefix}-{digest.hexdigest()[:12]}"
