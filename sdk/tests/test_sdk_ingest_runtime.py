"""The ingest runtime: records.jsonl, the files folder and the report of a real fetch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from osa_sdk import (
    EXIT_CONTRACT_ERROR,
    ContractError,
    FailedRef,
    FetchContext,
    Ingester,
    IngesterFileRef,
    IngesterRecord,
    IngestError,
    IngestReport,
    RecordRef,
    SkippedRecord,
    files_dir_for,
    ingester,
    run_ingest,
)
from osa_sdk.contract import BYTES_PER_MB, FILES_DIR, INGEST_REPORT_FILE, RECORDS_FILE
from sdk_sample_ingesters import ScriptedIngester
from sdk_test_support import run_sdk, sdk_env


def ref(source_id: str, **extra: Any) -> RecordRef:
    return RecordRef(source_id=source_id, extra=extra)


def written_records(out_dir: Path) -> list[IngesterRecord]:
    lines = (out_dir / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    return [IngesterRecord.model_validate_json(line) for line in lines]


def record_folders(out_dir: Path) -> set[str]:
    files_root = out_dir / FILES_DIR
    return {p.name for p in files_root.iterdir()} if files_root.exists() else set()


class _Fixed(Ingester):
    """An ingester that returns whatever the test hands it, regardless of the refs."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make

    def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
        return []

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterable[IngesterRecord]:
        return self.make(ctx)


@ingester("limited", max_file_mb=1 / 1024)  # 1024 bytes
class _Limited(_Fixed):
    pass


def test_records_and_files_land_in_the_folder_of_their_id(tmp_path: Path) -> None:
    awkward = ["pdb:1ABC", "upload/2024/a", "me@lab.org", "with space", "../../etc", "é"]
    refs = [ref(i, files={"entry.cif": 10 + n}) for n, i in enumerate(awkward)]

    report = run_ingest(ScriptedIngester(title="t"), refs, tmp_path)

    records = written_records(tmp_path)
    assert [r.source_id for r in records] == awkward
    assert record_folders(tmp_path) == {files_dir_for(i) for i in awkward}
    for n, record in enumerate(records):
        on_disk = tmp_path / FILES_DIR / files_dir_for(record.source_id) / "entry.cif"
        assert on_disk.read_bytes() == b"x" * (10 + n)
        # Size and digest are the SDK's, from the bytes on disk.
        assert record.files == [
            IngesterFileRef(
                name="entry.cif",
                path="entry.cif",
                size_mb=(10 + n) / BYTES_PER_MB,
                sha256=hashlib.sha256(b"x" * (10 + n)).hexdigest(),
            )
        ]
        assert record.metadata == {"title": "t"}
    assert report == IngestReport(records=len(awkward), max_file_mb=1 / 1024)
    saved = IngestReport.model_validate_json((tmp_path / INGEST_REPORT_FILE).read_text())
    assert saved == report


def test_a_record_with_any_file_over_the_limit_is_skipped_counted_and_removed(
    tmp_path: Path,
) -> None:
    refs = [
        ref("too_big", files={"small.txt": 10, "big.cif": 1025}),
        ref("at_limit", files={"exact.cif": 1024}),
    ]

    report = run_ingest(ScriptedIngester(), refs, tmp_path)

    assert report.skipped_oversize == [
        SkippedRecord(source_id="too_big", file_name="big.cif", size_mb=1025 / BYTES_PER_MB)
    ]
    assert report.records == 1
    assert [r.source_id for r in written_records(tmp_path)] == ["at_limit"]
    assert record_folders(tmp_path) == {files_dir_for("at_limit")}


def test_sizes_are_measured_on_disk_not_taken_from_the_record(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        ctx.record_dir("liar").mkdir(parents=True)
        (ctx.record_dir("liar") / "big.cif").write_bytes(b"x" * 5000)
        declared = IngesterFileRef(name="big.cif", path="big.cif", size_mb=0.0)
        yield IngesterRecord(source_id="liar", files=[declared])

    report = run_ingest(_Limited(make), [ref("liar")], tmp_path)

    assert report.skipped_oversize == [
        SkippedRecord(source_id="liar", file_name="big.cif", size_mb=5000 / BYTES_PER_MB)
    ]
    assert record_folders(tmp_path) == set()


def test_failed_and_missing_refs_are_reported_and_leave_no_files(tmp_path: Path) -> None:
    refs = [
        ref("ok"),
        ref("gone", files={"partial.cif": 5}, fail="HTTP 404"),
        ref("forgotten", files={"orphan.cif": 5}, drop=True),
    ]

    report = run_ingest(ScriptedIngester(), refs, tmp_path)

    assert report.records == 1
    assert report.failed == [FailedRef(source_id="gone", error="HTTP 404")]
    assert report.missing == [FailedRef(source_id="forgotten", error="not returned by fetch")]
    assert [r.source_id for r in written_records(tmp_path)] == ["ok"]
    assert record_folders(tmp_path) == set()


def test_a_record_returned_twice_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        yield IngesterRecord(source_id="pdb:1ABC")
        yield IngesterRecord(source_id="pdb:1ABC")

    with pytest.raises(IngestError, match=r"'pdb:1ABC' twice"):
        run_ingest(_Fixed(make), [ref("pdb:1ABC")], tmp_path)
    assert not (tmp_path / INGEST_REPORT_FILE).exists()


def test_a_record_that_was_not_asked_for_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        yield IngesterRecord(source_id="pdb:9XYZ")

    with pytest.raises(IngestError, match=r"'pdb:9XYZ', which is not one of its refs"):
        run_ingest(_Fixed(make), [ref("pdb:1ABC")], tmp_path)
    assert not (tmp_path / INGEST_REPORT_FILE).exists()


def test_a_listed_file_that_does_not_exist_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        ghost = IngesterFileRef(name="ghost.cif", path="ghost.cif", size_mb=1.0)
        yield IngesterRecord(source_id="a", files=[ghost])

    with pytest.raises(IngestError, match=r"record 'a': file 'ghost.cif' does not exist"):
        run_ingest(_Fixed(make), [ref("a")], tmp_path)


def test_a_file_path_outside_the_record_folder_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        ctx.add_bytes("b", "secret.cif", b"1")
        escape = IngesterFileRef(name="x", path="../b/secret.cif", size_mb=0)
        yield IngesterRecord(source_id="a", files=[escape])

    with pytest.raises(IngestError, match=r"record 'a': file path '../b/secret.cif'"):
        run_ingest(_Fixed(make), [ref("a"), ref("b")], tmp_path)


def test_a_file_written_but_not_listed_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        kept = ctx.add_bytes("a", "kept.cif", b"1")
        ctx.add_bytes("a", "stray.tmp", b"2")
        yield IngesterRecord(source_id="a", files=[kept])

    with pytest.raises(IngestError, match=r"does not list: stray.tmp"):
        run_ingest(_Fixed(make), [ref("a")], tmp_path)


def test_a_record_both_returned_and_failed_fails_the_ingest(tmp_path: Path) -> None:
    def make(ctx: FetchContext) -> Iterable[IngesterRecord]:
        yield IngesterRecord(source_id="a")
        ctx.fail("a", "changed my mind")

    with pytest.raises(IngestError, match=r"'a' was returned by fetch and also reported failed"):
        run_ingest(_Fixed(make), [ref("a")], tmp_path)


def test_duplicate_refs_are_refused_before_fetching(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"'a' appears twice"):
        run_ingest(ScriptedIngester(), [ref("a"), ref("a")], tmp_path)
    assert not (tmp_path / RECORDS_FILE).exists()


def test_a_folder_that_already_holds_an_ingest_is_refused(tmp_path: Path) -> None:
    run_ingest(ScriptedIngester(), [ref("a", files={"f": 1})], tmp_path)

    with pytest.raises(IngestError, match=r"already holds an ingest"):
        run_ingest(ScriptedIngester(), [ref("b")], tmp_path)
    assert [r.source_id for r in written_records(tmp_path)] == ["a"]


def _write_refs(path: Path, refs: list[RecordRef]) -> None:
    path.write_text("".join(r.model_dump_json() + "\n" for r in refs), encoding="utf-8")


def test_the_ingest_command_writes_a_batch_folder(tmp_path: Path) -> None:
    refs_path, out = tmp_path / "refs.jsonl", tmp_path / "raw"
    _write_refs(refs_path, [ref("pdb:1ABC", files={"1abc.cif": 7}), ref("x", fail="404")])

    proc = run_sdk(
        "ingest",
        "sdk_sample_ingesters:ScriptedIngester",
        "--refs",
        str(refs_path),
        "--out",
        str(out),
        "--config",
        json.dumps({"title": "from the command line"}),
        env=sdk_env(),
    )

    assert proc.returncode == 0, proc.stderr
    [record] = written_records(out)
    assert record.source_id == "pdb:1ABC" and record.metadata == {"title": "from the command line"}
    assert (out / FILES_DIR / "pdb_3a1ABC" / "1abc.cif").read_bytes() == b"x" * 7
    report = json.loads((out / INGEST_REPORT_FILE).read_text())
    assert report["records"] == 1
    assert report["failed"] == [{"source_id": "x", "error": "404"}]


@pytest.mark.parametrize(
    ("target", "refs_line", "config", "message"),
    [
        ("no_such_module:X", "{}", "{}", "cannot import module 'no_such_module'"),
        ("sdk_sample_hooks:plain", "{}", "{}", "is not a subclass of osa_sdk.Ingester"),
        ("sdk_sample_ingesters:ScriptedIngester", "{}", "{}", "line 1 is not a valid RecordRef"),
        ("sdk_sample_ingesters:ScriptedIngester", '{"source_id": "a"}', "[1]", "JSON object"),
    ],
)
def test_the_ingest_command_refuses_a_bad_setup(
    tmp_path: Path, target: str, refs_line: str, config: str, message: str
) -> None:
    refs_path = tmp_path / "refs.jsonl"
    refs_path.write_text(refs_line + "\n")

    proc = run_sdk(
        "ingest",
        target,
        "--refs",
        str(refs_path),
        "--out",
        str(tmp_path / "raw"),
        "--config",
        config,
        env=sdk_env(),
    )

    assert proc.returncode == EXIT_CONTRACT_ERROR
    assert message in proc.stderr
    assert not (tmp_path / "raw").exists()


def test_the_ingest_command_exits_1_when_the_ingest_fails(tmp_path: Path) -> None:
    refs_path, out = tmp_path / "refs.jsonl", tmp_path / "raw"
    _write_refs(refs_path, [ref("a")])
    (out / FILES_DIR).mkdir(parents=True)

    proc = run_sdk(
        "ingest",
        "sdk_sample_ingesters:ScriptedIngester",
        "--refs",
        str(refs_path),
        "--out",
        str(out),
        env=sdk_env(),
    )

    assert proc.returncode == 1
    assert "ingest failed" in proc.stderr and "already holds an ingest" in proc.stderr
