"""What authors write against: FetchContext, @ingester and @hook."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from osa_sdk import (
    FetchContext,
    Hook,
    HookRecord,
    HookRecordId,
    Ingester,
    IngesterFileRef,
    IngesterRecord,
    RecordRef,
    files_dir_for,
    hook,
    ingester,
)
from osa_sdk.contract import BYTES_PER_MB

ID = "pdb:1ABC"


@pytest.fixture
def ctx(tmp_path: Path) -> FetchContext:
    return FetchContext(tmp_path / "files", max_file_mb=50, source_ids=[ID, "other"])


def folder(ctx: FetchContext, source_id: str = ID) -> Path:
    return ctx.files_root / files_dir_for(source_id)


def test_add_file_copies_into_the_record_folder_and_measures_its_mb(
    ctx: FetchContext, tmp_path: Path
) -> None:
    src = tmp_path / "download.cif"
    src.write_bytes(b"a" * (5 * BYTES_PER_MB // 2))

    default_name = ctx.add_file(ID, src)
    renamed = ctx.add_file(ID, src, name="1abc.cif")

    assert default_name == IngesterFileRef(name="download.cif", path="download.cif", size_mb=2.5)
    assert renamed.name == "1abc.cif" and renamed.size_mb == 2.5
    assert sorted(p.name for p in folder(ctx).iterdir()) == ["1abc.cif", "download.cif"]
    assert (folder(ctx) / "1abc.cif").read_bytes() == src.read_bytes()
    assert src.exists()


def test_add_bytes_writes_the_bytes(ctx: FetchContext) -> None:
    ref = ctx.add_bytes(ID, "meta.json", b"{}")

    assert (folder(ctx) / "meta.json").read_bytes() == b"{}"
    assert ref.size_mb == 2 / BYTES_PER_MB


def test_open_file_streams_and_gives_the_ref_after_the_block(ctx: FetchContext) -> None:
    pending = ctx.open_file(ID, "big.cif")
    with pending as out:
        for _ in range(3):
            out.write(b"z" * 1000)
        with pytest.raises(RuntimeError, match=r"'big.cif' is not complete"):
            _ = pending.ref
        assert not (folder(ctx) / "big.cif").exists()

    assert pending.ref == IngesterFileRef(
        name="big.cif", path="big.cif", size_mb=3000 / BYTES_PER_MB
    )
    assert (folder(ctx) / "big.cif").read_bytes() == b"z" * 3000


def test_an_interrupted_stream_leaves_nothing_and_frees_the_name(ctx: FetchContext) -> None:
    with pytest.raises(ConnectionError), ctx.open_file(ID, "big.cif") as out:
        out.write(b"half")
        raise ConnectionError("connection reset")

    assert list(folder(ctx).iterdir()) == []
    assert ctx.add_bytes(ID, "big.cif", b"whole").size_mb == 5 / BYTES_PER_MB


def test_add_file_of_a_missing_source_leaves_nothing(ctx: FetchContext, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ctx.add_file(ID, tmp_path / "not_downloaded.cif")

    assert list(folder(ctx).iterdir()) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape", "nul\x00", "é" * 128])
def test_a_bad_file_name_is_refused_naming_record_and_name(ctx: FetchContext, name: str) -> None:
    with pytest.raises(ValueError) as refused:
        ctx.add_bytes(ID, name, b"x")

    assert f"record {ID!r}" in str(refused.value)
    assert f"file name {name!r}" in str(refused.value)
    assert not ctx.files_root.exists()


def test_a_file_name_is_used_once_per_record(ctx: FetchContext) -> None:
    ctx.add_bytes(ID, "entry.cif", b"1")
    ctx.add_bytes("other", "entry.cif", b"2")

    with pytest.raises(ValueError, match=r"'entry.cif' was already added"):
        ctx.add_bytes(ID, "entry.cif", b"3")
    assert (folder(ctx) / "entry.cif").read_bytes() == b"1"


def test_files_and_failures_only_for_the_refs_of_the_fetch(ctx: FetchContext) -> None:
    with pytest.raises(ValueError, match=r"'pdb:9XYZ' is not one of the refs"):
        ctx.add_bytes("pdb:9XYZ", "x.cif", b"1")
    with pytest.raises(ValueError, match=r"'pdb:9XYZ' is not one of the refs"):
        ctx.fail("pdb:9XYZ", "404")


def test_fail_records_one_error_per_ref(ctx: FetchContext) -> None:
    ctx.fail(ID, "HTTP 404")

    with pytest.raises(ValueError, match=r"already reported failed \('HTTP 404'\)"):
        ctx.fail(ID, "HTTP 500")
    assert ctx.failures == {ID: "HTTP 404"}


class _Complete(Ingester):
    def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
        return [RecordRef(source_id="a")]

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterable[IngesterRecord]:
        return []


def test_ingester_names_the_class_and_sets_its_limit() -> None:
    decorated = ingester("pdb", max_file_mb=250)(_Complete)

    assert decorated is _Complete
    assert (decorated.name, decorated.max_file_mb) == ("pdb", 250)
    assert decorated(mirror="rcsb").config == {"mirror": "rcsb"}


def test_ingester_refuses_a_class_that_is_not_an_ingester() -> None:
    class Lookalike:
        def discover(self) -> None: ...
        def fetch(self) -> None: ...

    with pytest.raises(TypeError, match=r"not a subclass of osa_sdk.Ingester"):
        ingester("pdb")(Lookalike)  # type: ignore[type-var]


def test_ingester_refuses_a_class_without_fetch() -> None:
    class NoFetch(Ingester):
        def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
            return []

    with pytest.raises(TypeError, match=r"NoFetch does not implement fetch"):
        ingester("pdb")(NoFetch)


@pytest.mark.parametrize(("name", "limit"), [("", None), ("pdb", 0), ("pdb", -1.5)])
def test_ingester_refuses_a_bad_name_or_limit(name: str, limit: float | None) -> None:
    with pytest.raises(ValueError, match=r"@ingester"):
        ingester(name, max_file_mb=limit)


def _record() -> HookRecord:
    return HookRecord(id=HookRecordId("pdb:1ABC"), files_dir="pdb_3a1ABC")


def test_bare_hook_is_named_after_its_function_and_stays_callable() -> None:
    @hook
    def count_chains(record: HookRecord) -> dict[str, Any]:
        """Counts chains."""
        return {"id": record.id}

    assert isinstance(count_chains, Hook)
    assert count_chains.name == "count_chains"
    assert count_chains.__doc__ == "Counts chains."
    assert count_chains(_record()) == {"id": "pdb:1ABC"}
    assert not count_chains.accepts_config


def test_named_hook_takes_the_given_name_and_sees_config() -> None:
    @hook(name="resolution_check")
    def check(record: HookRecord, config: dict[str, Any]) -> None:
        return None

    assert check.name == "resolution_check"
    assert check.accepts_config
    assert check(_record(), config={}) is None


def test_hook_refuses_what_is_not_callable() -> None:
    with pytest.raises(TypeError, match=r"is not callable"):
        hook(name="x")(42)  # type: ignore[arg-type]
