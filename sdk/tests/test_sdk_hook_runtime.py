"""The hook runtime, end to end: `python -m osa_sdk hook ...` over real batch folders."""

from __future__ import annotations

import gc
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from osa_sdk import EXIT_CONTRACT_ERROR, EXIT_MEMORY_ERROR, HookOutOfMemory, Reject, run_hook
from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_OUT,
    ERRORS_FILE,
    FEATURES_FILE,
    MAX_FEATURE_ROWS_PER_RECORD,
    MAX_OUTCOME_LINE_BYTES,
    REJECTIONS_FILE,
)
from osa_sdk.types import HookRecord
from sdk_sample_hooks import plain, scripted
from sdk_test_support import Batch, ids, run_sdk

SCRIPTED = "sdk_sample_hooks:scripted"


def test_every_record_gets_exactly_one_outcome_in_file_order(batch: Batch) -> None:
    batch.write_records(
        [
            {"id": "r0"},
            {"id": "r1", "metadata": {"action": "features", "features": {"n_atoms": 3}}},
            {"id": "r2", "metadata": {"action": "features", "features": [{"a": 1}, {"a": 2}]}},
            {"id": "r3", "metadata": {"action": "reject", "reason": "no coordinates"}},
            {"id": "r4", "metadata": {"action": "raise", "message": "boom"}},
            {"id": "r5", "metadata": {"action": "bad_return"}},
            {"id": "r6", "metadata": {"action": "unserialisable"}},
            {"id": "r7"},
        ]
    )

    proc = batch.run(SCRIPTED)

    assert proc.returncode == 0, proc.stderr
    out = batch.outcomes()
    assert out[FEATURES_FILE] == [
        {"id": "r0", "features": []},
        {"id": "r1", "features": [{"n_atoms": 3}]},
        {"id": "r2", "features": [{"a": 1}, {"a": 2}]},
        {"id": "r7", "features": []},
    ]
    assert out[REJECTIONS_FILE] == [{"id": "r3", "reason": "no coordinates"}]
    assert out[ERRORS_FILE][0] == {"id": "r4", "error": "ValueError: boom", "retryable": False}
    assert ids(out[ERRORS_FILE]) == ["r4", "r5", "r6"]
    assert out[ERRORS_FILE][1]["error"].startswith("TypeError: a hook returns None, a dict")
    assert "PydanticSerializationError" in out[ERRORS_FILE][2]["error"]
    assert "4 passed, 1 rejected, 3 errored" in proc.stderr


def test_an_exception_fails_only_its_record(batch: Batch) -> None:
    batch.write_records(
        [
            {"id": "before"},
            {"id": "broken", "metadata": {"action": "raise", "message": "bad residue"}},
            {"id": "after"},
        ]
    )

    proc = batch.run(SCRIPTED)

    assert proc.returncode == 0, proc.stderr
    out = batch.outcomes()
    assert ids(out[FEATURES_FILE]) == ["before", "after"]
    assert out[ERRORS_FILE] == [
        {"id": "broken", "error": "ValueError: bad residue", "retryable": False}
    ]
    # The traceback is in the log, so a curator can see where the hook failed.
    assert "bad residue" in proc.stderr and "Traceback" in proc.stderr


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_memory_error_exits_with_memory_code_and_keeps_earlier_outcomes(batch: Batch) -> None:
    batch.write_records(
        [
            {"id": "small"},
            {"id": "rejected", "metadata": {"action": "reject", "reason": "r"}},
            {"id": "huge", "metadata": {"action": "allocate", "mb": 4000}},
            {"id": "never_reached"},
        ]
    )

    proc = batch.run(SCRIPTED, preexec_fn=_cap_address_space)

    assert proc.returncode == EXIT_MEMORY_ERROR, proc.stderr
    out = batch.outcomes()
    assert ids(out[FEATURES_FILE]) == ["small"]
    assert ids(out[REJECTIONS_FILE]) == ["rejected"]
    assert out[ERRORS_FILE] == []
    assert "out of memory on record 'huge'" in proc.stderr


def test_memory_error_in_process_raises_a_system_exit_with_the_memory_code(batch: Batch) -> None:
    batch.write_records([{"id": "ok"}, {"id": "huge"}])

    def hook(record: object) -> None:
        if getattr(record, "id", None) == "huge":
            raise MemoryError
        return None

    with pytest.raises(HookOutOfMemory) as raised:
        run_hook(hook, batch.in_dir, batch.out_dir, batch.files_root, "h")

    assert raised.value.code == EXIT_MEMORY_ERROR
    assert raised.value.record_id == "huge"
    assert ids(batch.outcomes()[FEATURES_FILE]) == ["ok"]


def test_sigkill_mid_batch_keeps_whole_lines_for_finished_records(
    batch: Batch, tmp_path: Path
) -> None:
    marker = tmp_path / "started"
    records = [
        {"id": f"r{i}", "metadata": {"action": "features", "features": {"i": i}}} for i in range(5)
    ]
    records.append(
        {"id": "slow", "metadata": {"action": "sleep", "marker": str(marker), "seconds": 60}}
    )
    records.append({"id": "after"})
    batch.write_records(records)

    proc = subprocess.Popen(
        [sys.executable, "-m", "osa_sdk", "hook", SCRIPTED],
        env=batch.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline, "the hook never reached the slow record"
            assert proc.poll() is None, f"the hook exited early with {proc.returncode}"
            time.sleep(0.02)
        proc.kill()
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()

    out = batch.outcomes()
    assert out[FEATURES_FILE] == [{"id": f"r{i}", "features": [{"i": i}]} for i in range(5)]
    assert out[REJECTIONS_FILE] == [] and out[ERRORS_FILE] == []


def test_garbage_of_a_record_is_collected_before_the_next_one(batch: Batch) -> None:
    batch.write_records(
        [
            {"id": "cyclic", "metadata": {"action": "leave_cycle"}},
            {"id": "count", "metadata": {"action": "count_finalised"}},
        ]
    )

    proc = batch.run(SCRIPTED)

    assert proc.returncode == 0, proc.stderr
    assert batch.outcomes()[FEATURES_FILE][1] == {
        "id": "count",
        "features": [{"finalised": ["cyclic"]}],
    }


def test_config_reaches_a_hook_that_asks_for_it(batch: Batch) -> None:
    batch.write_records([{"id": "a"}])
    batch.write_config({"threshold": 3.5})

    configured = batch.run("sdk_sample_hooks:with_config")
    plain_run = run_sdk("hook", "sdk_sample_hooks:plain", env=batch.env())

    assert configured.returncode == 0, configured.stderr
    assert plain_run.returncode == 0, plain_run.stderr
    assert ids(batch.outcomes()[FEATURES_FILE]) == ["a", "a"]
    assert [line["features"] for line in batch.outcomes()[FEATURES_FILE]] == [
        [{"threshold": 3.5, "id": "a"}],
        [{"id_length": 1}],
    ]


def test_a_config_hook_without_config_file_gets_an_empty_config(batch: Batch) -> None:
    batch.write_records([{"id": "a"}])

    proc = batch.run("sdk_sample_hooks:with_config")

    assert proc.returncode == 0, proc.stderr
    assert batch.outcomes()[FEATURES_FILE] == [
        {"id": "a", "features": [{"threshold": None, "id": "a"}]}
    ]


@pytest.mark.parametrize("record_id", ["pdb:1ABC", "upload/2024/x", "me@lab", "a b", "..", "é"])
def test_a_hook_finds_its_files_through_files_dir(batch: Batch, record_id: str) -> None:
    batch.write_records(
        [{"id": record_id, "metadata": {"action": "read_file", "name": "entry.cif"}}]
    )
    batch.add_file(record_id, "entry.cif", f"data_{record_id}")

    proc = batch.run(SCRIPTED)

    assert proc.returncode == 0, proc.stderr
    assert batch.outcomes()[FEATURES_FILE] == [
        {"id": record_id, "features": [{"text": f"data_{record_id}"}]}
    ]


def test_a_malformed_line_fails_before_any_record_is_processed(batch: Batch) -> None:
    batch.write_records([{"id": "good"}])
    with (batch.in_dir / "records.jsonl").open("a") as records:
        records.write('{"id": "no_files_dir"}\n')

    proc = batch.run(SCRIPTED)

    assert proc.returncode == EXIT_CONTRACT_ERROR
    assert "line 2" in proc.stderr and "files_dir" in proc.stderr
    assert all(lines == [] for lines in batch.outcomes().values())


def test_a_duplicate_record_id_is_a_contract_error(batch: Batch) -> None:
    batch.write_records([{"id": "twice"}, {"id": "twice"}])

    proc = batch.run(SCRIPTED)

    assert proc.returncode == EXIT_CONTRACT_ERROR
    assert "'twice' appears twice" in proc.stderr
    assert all(lines == [] for lines in batch.outcomes().values())


@pytest.mark.parametrize("missing", [ENV_IN, ENV_OUT, ENV_FILES, ENV_HOOK_NAME])
def test_a_missing_env_var_is_named(batch: Batch, missing: str) -> None:
    batch.write_records([{"id": "a"}])
    env = batch.env()
    del env[missing]

    proc = run_sdk("hook", SCRIPTED, env=env)

    assert proc.returncode == EXIT_CONTRACT_ERROR
    assert missing in proc.stderr
    assert all(lines == [] for lines in batch.outcomes().values())


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module:fn", "cannot import module 'no_such_module'"),
        ("sdk_sample_hooks:missing", "has no missing"),
        ("sdk_sample_hooks:NOT_CALLABLE", "is int, not a function"),
        ("sdk_sample_hooks", "must look like pkg.module:name"),
    ],
)
def test_a_bad_target_is_a_contract_error(batch: Batch, target: str, message: str) -> None:
    batch.write_records([{"id": "a"}])

    proc = batch.run(target)

    assert proc.returncode == EXIT_CONTRACT_ERROR
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_outcomes_append_after_a_torn_line_is_cut(batch: Batch) -> None:
    features = batch.out_dir / FEATURES_FILE
    features.write_text('{"id": "earlier", "features": []}\n{"id": "torn", "feat')
    batch.write_records([{"id": "next"}])

    summary = run_hook(scripted, batch.in_dir, batch.out_dir, batch.files_root, "h")

    assert summary.passed == 1
    assert features.read_text() == (
        '{"id": "earlier", "features": []}\n{"id":"next","features":[]}\n'
    )


def test_run_hook_in_process_counts_outcomes_and_accepts_plain_functions(batch: Batch) -> None:
    batch.write_records([{"id": "abc"}, {"id": "de"}])

    summary = run_hook(plain, batch.in_dir, batch.out_dir, batch.files_root, "plain")

    assert (summary.passed, summary.rejected, summary.errored) == (2, 0, 0)
    # The heap frozen for the run is given back to the collector of the calling process.
    assert gc.get_freeze_count() == 0
    assert batch.outcomes()[FEATURES_FILE] == [
        {"id": "abc", "features": [{"id_length": 3}]},
        {"id": "de", "features": [{"id_length": 2}]},
    ]


def test_a_rejection_reason_that_is_not_text_is_written_as_text(batch: Batch) -> None:
    batch.write_records([{"id": "a"}, {"id": "b"}])

    def reject_with_a_number(record: object) -> None:
        raise Reject(42)  # type: ignore[arg-type]

    summary = run_hook(reject_with_a_number, batch.in_dir, batch.out_dir, batch.files_root, "h")

    assert summary.rejected == 2
    assert batch.outcomes()[REJECTIONS_FILE] == [
        {"id": "a", "reason": "42"},
        {"id": "b", "reason": "42"},
    ]


def test_nan_and_infinities_error_their_record_instead_of_becoming_null(batch: Batch) -> None:
    batch.write_records([{"id": "nan"}, {"id": "inf"}, {"id": "fine"}])
    values = {"nan": float("nan"), "inf": [{"nested": [1.0, float("-inf")]}], "fine": 1.5}

    def measure(record: HookRecord) -> dict:
        return {"rmsd": values[record.id]}

    summary = run_hook(measure, batch.in_dir, batch.out_dir, batch.files_root, "measure")

    assert (summary.passed, summary.errored) == (1, 2)
    assert batch.outcomes()[FEATURES_FILE] == [{"id": "fine", "features": [{"rmsd": 1.5}]}]
    hint = "JSON has no NaN or Infinity; use None or a string"
    assert batch.outcomes()[ERRORS_FILE] == [
        {"id": "nan", "error": f"ValueError: features[0].rmsd is NaN: {hint}", "retryable": False},
        {
            "id": "inf",
            "error": f"ValueError: features[0].rmsd[0].nested[1] is -Infinity: {hint}",
            "retryable": False,
        },
    ]


def test_features_over_the_engines_caps_error_their_record_with_the_cap(batch: Batch) -> None:
    """Said by the SDK, before writing, rather than refused by the engine after."""
    batch.write_records([{"id": "rows"}, {"id": "bytes"}, {"id": "fine"}])
    rows = {
        "rows": [{}] * (MAX_FEATURE_ROWS_PER_RECORD + 1),
        "bytes": [{"blob": "x" * MAX_OUTCOME_LINE_BYTES}],
        "fine": [{}] * MAX_FEATURE_ROWS_PER_RECORD,
    }

    def emit(record: HookRecord) -> list[dict]:
        return rows[record.id]

    summary = run_hook(emit, batch.in_dir, batch.out_dir, batch.files_root, "emit")

    assert (summary.passed, summary.errored) == (1, 2)
    [fine] = batch.outcomes()[FEATURES_FILE]
    assert (fine["id"], len(fine["features"])) == ("fine", MAX_FEATURE_ROWS_PER_RECORD)
    errors = {line["id"]: line["error"] for line in batch.outcomes()[ERRORS_FILE]}
    assert errors == {
        "rows": f"ValueError: {MAX_FEATURE_ROWS_PER_RECORD + 1} feature rows: the engine takes "
        f"at most {MAX_FEATURE_ROWS_PER_RECORD} per record; write larger results to a file",
        "bytes": "ValueError: features of 4.0 MB as JSON: the engine takes at most 4.0 MB per "
        "record; write larger results to a file",
    }


def test_reasons_name_a_records_files_without_the_folder_they_were_found_in(
    batch: Batch,
) -> None:
    batch.write_records([{"id": "pdb:1abc"}, {"id": "pdb:2xyz"}])

    def parse(record: HookRecord) -> None:
        path = record.file("structure.cif.gz")
        if record.id == "pdb:1abc":
            raise Reject(f"{path.name} cannot be read as mmCIF (failed to read {path}: line 3)")
        raise OSError(f"[Errno 2] No such file: '{path}' in {record.files_path}")

    run_hook(parse, batch.in_dir, batch.out_dir, batch.files_root, "h")

    outcomes = batch.outcomes()
    [rejection] = outcomes[REJECTIONS_FILE]
    assert rejection["reason"] == (
        "structure.cif.gz cannot be read as mmCIF (failed to read structure.cif.gz: line 3)"
    )
    [error] = outcomes[ERRORS_FILE]
    assert error["error"] == "OSError: [Errno 2] No such file: 'structure.cif.gz' in ."
    assert str(batch.files_root) not in rejection["reason"] + error["error"]
