"""Hook output the engine cannot trust: every bad case ends in a definite status, never a crash."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.types import OutcomeStatus

from osa_dagster.engine import OutputReader
from osa_dagster.engine.outputs import MAX_OUTPUT_ENTRIES

from .helpers import RAW_OUTPUT, Harness, record

PASSED, REJECTED, ERRORED = OutcomeStatus.PASSED, OutcomeStatus.REJECTED, OutcomeStatus.ERRORED


def passed(record_id: Any, **features: Any) -> str:
    return json.dumps({"id": record_id, "features": [features]}) + "\n"


def test_reader_consumes_only_complete_lines(tmp_path: Path) -> None:
    offsets: dict[str, int] = {}
    reader = OutputReader(tmp_path, offsets)
    features = tmp_path / "features.jsonl"
    assert list(reader.new_lines()) == []

    features.write_text(passed("a") + '{"id": "b", "feat')
    assert list(reader.new_lines()) == [("features.jsonl", passed("a").strip().encode())]
    assert list(reader.new_lines()) == []

    with features.open("a") as f:
        f.write('ures": []}\n')
    assert list(reader.new_lines()) == [("features.jsonl", b'{"id": "b", "features": []}')]
    assert offsets == {"features.jsonl": features.stat().st_size}

    resumed = OutputReader(tmp_path, dict(offsets))
    assert list(resumed.new_lines()) == []


# raw_output.py config -> expected (status, reason) per record, and the anomalies counted
CASES: dict[str, tuple[dict[str, Any], dict[str, tuple[OutcomeStatus, str | None]], dict]] = {
    "malformed lines": (
        {
            "*": {
                "write": {
                    "features.jsonl": "not json\n[1, 2]\n"
                    + '{"id": "a"}\n'
                    + passed(5)
                    + "\udcff\udcfe\n"
                    + "\n"
                    + passed("b", n=1),
                    "errors.jsonl": '{"id": "a", "error": 3}\n',
                }
            }
        },
        {"a": (ERRORED, "no outcome: the hook exited 0 without writing one"), "b": (PASSED, None)},
        {"malformed_lines": 6, "no_outcome": 1},
    ),
    "unknown ids": (
        {"*": {"write": {"features.jsonl": passed("zzz") + passed("a") + passed("b")}}},
        {"a": (PASSED, None), "b": (PASSED, None)},
        {"unknown_ids": 1},
    ),
    "conflicting outcomes": (
        {
            "*": {
                "write": {
                    "features.jsonl": passed("a") + passed("b"),
                    "rejections.jsonl": '{"id": "a", "reason": "too big"}\n',
                    "errors.jsonl": '{"id": "a", "error": "oops"}\n',
                }
            }
        },
        {
            "a": (ERRORED, "conflicting outcomes: passed and rejected (too big)"),
            "b": (PASSED, None),
        },
        {"conflicting_outcomes": 2},
    ),
    "exact duplicates": (
        {"*": {"write": {"features.jsonl": passed("a", n=1) * 3 + passed("b")}}},
        {"a": (PASSED, None), "b": (PASSED, None)},
        {"duplicate_outcomes": 2},
    ),
    "empty out dir, exit 0": (
        {"*": {}},
        {
            "a": (ERRORED, "no outcome: the hook exited 0 without writing one"),
            "b": (ERRORED, "no outcome: the hook exited 0 without writing one"),
        },
        {"no_outcome": 2},
    ),
    "partial last line": (
        {"*": {"write": {"features.jsonl": passed("a") + passed("b").strip()}}},
        {"a": (PASSED, None), "b": (ERRORED, "no outcome: the hook exited 0 without writing one")},
        {"no_outcome": 1},
    ),
    "NaN and infinities": (
        {
            "*": {
                "write": {
                    "features.jsonl": '{"id": "a", "features": [{"rmsd": NaN}]}\n'
                    + '{"id": "b", "features": [{"ok": 1}, {"x": [1, -Infinity]}]}\n'
                }
            }
        },
        {
            "a": (ERRORED, "the hook wrote features[0].rmsd is NaN, which JSON cannot hold"),
            "b": (ERRORED, "the hook wrote features[1].x[1] is -Infinity, which JSON cannot hold"),
        },
        {"non_finite_numbers": 2},
    ),
    "non-zero exit": (
        {"*": {"write": {"features.jsonl": passed("a")}, "stderr": "Traceback: boom\n", "exit": 3}},
        {"a": (PASSED, None), "b": (ERRORED, "hook exited with code 3: Traceback: boom")},
        {},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_output(harness: Harness, case: str) -> None:
    config, expected, anomalies = CASES[case]
    spec = harness.spec(RAW_OUTPUT, **config)

    checkpoint = harness.run(spec, [record("a", 1), record("b", 2)])

    assert checkpoint.complete
    assert {rid: (o.status, o.reason) for rid, o in checkpoint.outcomes.items()} == expected
    assert checkpoint.anomalies == anomalies


def test_outcome_for_a_record_settled_by_an_earlier_attempt_is_ignored(harness: Harness) -> None:
    spec = harness.spec(
        RAW_OUTPUT,
        **{
            "128": {"write": {"features.jsonl": passed("a", n=1)}, "exit": 99},
            "256": {"write": {"features.jsonl": passed("a", n=2) + passed("b", n=2)}},
        },
    )

    checkpoint = harness.run(spec, [record("a", 1), record("b", 2)])

    assert [a.memory_limit_mb for a in checkpoint.attempts] == [128, 256]
    assert checkpoint.outcomes["a"].features == [{"n": 1}]
    assert checkpoint.outcomes["b"].features == [{"n": 2}]
    assert checkpoint.anomalies == {"already_settled": 1}


NOT_REGULAR: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (os.mkfifo, "a FIFO"),
    "symlink": (lambda path: path.symlink_to("/etc/passwd"), "a symlink"),
    "character device": (
        lambda path: os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "a character device",
    ),
    "folder": (Path.mkdir, "a folder"),
}


@pytest.mark.parametrize("kind", NOT_REGULAR)
def test_reader_opens_only_regular_files(tmp_path: Path, kind: str) -> None:
    make, described = NOT_REGULAR[kind]
    (tmp_path / "features.jsonl").write_text(passed("a"))
    make(tmp_path / "errors.jsonl")
    reader = OutputReader(tmp_path, {})

    # A FIFO opened for reading would block here until a writer came: none ever comes.
    assert list(reader.new_lines()) == []
    assert reader.refused == f"errors.jsonl in the output folder is {described}, not a regular file"
    assert list(reader.new_lines()) == []  # refused for good


def test_reader_refuses_output_over_the_cap_whatever_files_hold_it(tmp_path: Path) -> None:
    reader = OutputReader(tmp_path, {}, max_output_bytes=BYTES_PER_MB)
    (tmp_path / "features.jsonl").write_text(passed("a"))
    assert [name for name, _ in reader.new_lines()] == ["features.jsonl"]
    # Not an outcome file, and in a subfolder: it still fills the disk, so it counts.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "junk.bin").write_bytes(b"x" * BYTES_PER_MB)

    assert list(reader.new_lines()) == []
    assert reader.refused == (
        "the hook wrote 1.0 MB into its output folder, over its cap of 1.0 MB "
        "(HookSpec.max_output_mb)"
    )


def test_reader_refuses_a_folder_of_too_many_entries(tmp_path: Path) -> None:
    for n in range(MAX_OUTPUT_ENTRIES + 1):
        (tmp_path / str(n)).touch()
    reader = OutputReader(tmp_path, {}, max_output_bytes=BYTES_PER_MB)

    assert list(reader.new_lines()) == []
    assert reader.refused == f"the output folder holds more than {MAX_OUTPUT_ENTRIES} entries"


REFUSED: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "a FIFO, then the hook hangs": (
        {"fifo": ["features.jsonl"], "sleep_s": 600},
        {},
        "features.jsonl in the output folder is a FIFO, not a regular file",
    ),
    "a symlink to outcomes written elsewhere": (
        {"symlink": {"features.jsonl": "{forged}"}},
        {},
        "features.jsonl in the output folder is a symlink, not a regular file",
    ),
    "output over the cap": (
        {
            "write": {
                "junk.bin": "x" * 2 * BYTES_PER_MB,
                "features.jsonl": passed("a") + passed("b"),
            }
        },
        {"max_output_mb": 1},
        "the hook wrote 2.0 MB into its output folder, over its cap of 1.0 MB "
        "(HookSpec.max_output_mb)",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_output_errors_the_records_and_stops_the_hook(
    harness: Harness, case: str
) -> None:
    scenario, spec_fields, reason = REFUSED[case]
    forged = harness.root / "forged.jsonl"
    forged.write_text(passed("a") + passed("b"))
    scenario = json.loads(json.dumps(scenario).replace("{forged}", str(forged)))
    spec = harness.spec(RAW_OUTPUT, timeout_s=600, **{"*": scenario}).model_copy(update=spec_fields)

    checkpoint = harness.run(spec, [record("a", 1), record("b", 2)])

    expected = (ERRORED, f"output refused: {reason}")
    assert {rid: (o.status, o.reason) for rid, o in checkpoint.outcomes.items()} == {
        "a": expected,
        "b": expected,
    }
    assert checkpoint.anomalies == {"refused_output": 1}
    [attempt] = checkpoint.attempts
    assert not attempt.timed_out  # stopped at once, not after the hook's timeout
