"""A hook's version: declared, or derived from what changes its judgement and nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from osa_dagster.engine.spec import (
    HookSpec,
    MemoryPolicy,
    hook_version,
    sdk_hook_command,
)


@pytest.fixture
def hook_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of SDK hooks on sys.path, whose source a test may change."""
    source = tmp_path / "judging_hooks.py"
    source.write_text("def check(record):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield source
    sys.modules.pop("judging_hooks", None)


def _spec(**changes: object) -> HookSpec:
    fields: dict[str, object] = {"command": sdk_hook_command("judging_hooks:check"), **changes}
    return HookSpec(name="check", **fields)  # type: ignore[arg-type]


def test_a_declared_version_is_the_version(hook_module: Path):
    assert hook_version(_spec(version="2")) == "2"
    with pytest.raises(ValidationError, match="version"):
        _spec(version="../escape")  # a version names a folder of the store


def test_what_changes_the_judgement_changes_the_version_and_nothing_else(hook_module: Path):
    first = hook_version(_spec(config={"least": 30}))
    assert first.startswith("src-")
    # Memory, time limits and the interpreter's path (host or container) do not judge.
    assert (
        hook_version(
            _spec(
                config={"least": 30},
                memory=MemoryPolicy(base_mb=64, cap_mb=128),
                timeout_s=5,
                command=("/usr/bin/python3", "-m", "osa_sdk", "hook", "judging_hooks:check"),
            )
        )
        == first
    )
    assert hook_version(_spec(config={"least": 31})) != first
    hook_module.write_text("def check(record):\n    raise ValueError('stricter')\n")
    assert hook_version(_spec(config={"least": 30})) != first


def test_a_command_hook_is_versioned_by_its_command_and_image():
    spec = HookSpec(name="check", command=("/bin/check", "--strict"), image="hooks:1")
    version = hook_version(spec)
    assert version.startswith("cmd-")
    assert hook_version(spec.model_copy(update={"image": "hooks@sha256:" + "a" * 64})) != version
    assert hook_version(spec.model_copy(update={"command": ("/bin/check",)})) != version
