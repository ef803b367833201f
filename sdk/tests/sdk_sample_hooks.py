"""Hooks for the SDK's tests, run as ``python -m osa_sdk hook sdk_sample_hooks:NAME``.

`scripted` does what each record's metadata asks, so one batch can produce every outcome.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from osa_sdk import HookRecord, Reject, hook
from osa_sdk.authoring import HookResult

_finalised: list[str] = []


class _Finalised:
    def __init__(self, name: str) -> None:
        self.name = name
        self.cycle = self

    def __del__(self) -> None:
        _finalised.append(self.name)


@hook
def scripted(record: HookRecord) -> HookResult:
    action = record.metadata.get("action", "pass")
    match action:
        case "pass":
            return None
        case "features":
            return record.metadata["features"]
        case "reject":
            raise Reject(record.metadata["reason"])
        case "raise":
            raise ValueError(record.metadata["message"])
        case "bad_return":
            return "not a dict"  # type: ignore[return-value]
        case "unserialisable":
            return {"value": object()}
        case "allocate":
            # A real allocation failure: the tests cap the address space with RLIMIT_AS.
            block = bytearray(record.metadata["mb"] * 1_000_000)
            return {"allocated": len(block)}
        case "sleep":
            Path(record.metadata["marker"]).write_text(record.id)
            time.sleep(record.metadata["seconds"])
            return None
        case "read_file":
            return {"text": record.file(record.metadata["name"]).read_text()}
        case "leave_cycle":
            # With automatic collection off, only the runtime's gc.collect() frees this.
            gc.disable()
            _Finalised(record.id)
            return None
        case "count_finalised":
            return {"finalised": list(_finalised)}
    raise AssertionError(f"unknown action {action!r}")


@hook(name="configured")
def with_config(record: HookRecord, config: dict[str, Any]) -> HookResult:
    return {"threshold": config.get("threshold"), "id": record.id}


def plain(record: HookRecord) -> HookResult:
    """An undecorated function: the runtime accepts it too."""
    return {"id_length": len(record.id)}


NOT_CALLABLE = 42
