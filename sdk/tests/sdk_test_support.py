"""Helpers of the SDK's tests: batch folders laid out as the engine lays them out, and the
SDK's command line run as a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osa_sdk.contract import (
    CONFIG_FILE,
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_OUT,
    OUTPUT_FILES,
    RECORDS_FILE,
    files_dir_for,
)

SDK_TESTS = Path(__file__).resolve().parent


def sdk_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that can import the sample hooks and ingesters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OSA_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SDK_TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_sdk(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "osa_sdk", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


@dataclass
class Batch:
    """One hook's view of a batch: $OSA_IN, $OSA_OUT and $OSA_FILES."""

    in_dir: Path
    out_dir: Path
    files_root: Path

    def write_records(self, records: list[dict[str, Any]]) -> None:
        """Write records.jsonl; a record is {"id": ..., "metadata": ...}."""
        lines = [
            json.dumps({"id": r["id"], "files_dir": files_dir_for(r["id"]), **r}) + "\n"
            for r in records
        ]
        (self.in_dir / RECORDS_FILE).write_text("".join(lines), encoding="utf-8")

    def write_config(self, config: dict[str, Any]) -> None:
        (self.in_dir / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")

    def add_file(self, record_id: str, name: str, text: str) -> None:
        folder = self.files_root / files_dir_for(record_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")

    def env(self, hook_name: str = "test_hook") -> dict[str, str]:
        return sdk_env(
            **{
                ENV_IN: str(self.in_dir),
                ENV_OUT: str(self.out_dir),
                ENV_FILES: str(self.files_root),
                ENV_HOOK_NAME: hook_name,
            }
        )

    def run(self, target: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_sdk("hook", target, env=self.env(), **kwargs)

    def outcomes(self) -> dict[str, list[dict[str, Any]]]:
        """Every output file's lines, parsed; each line must end with a newline."""
        result: dict[str, list[dict[str, Any]]] = {}
        for name in OUTPUT_FILES:
            path = self.out_dir / name
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            assert text == "" or text.endswith("\n"), f"{name} ends in a torn line: {text!r}"
            result[name] = [json.loads(line) for line in text.splitlines()]
        return result


def ids(lines: list[dict[str, Any]]) -> list[str]:
    return [line["id"] for line in lines]
