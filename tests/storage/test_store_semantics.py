"""What every artifact store must do, run on the filesystem store, S3 on moto and S3 on a
real SeaweedFS server: callers may not be able to tell them apart."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from osa_dagster.batch.stores import StoreCheckpointIO, StoreMemoryHistoryIO, UnreadableState
from osa_dagster.engine import Checkpoint
from osa_dagster.storage import ArtifactStore
from osa_dagster.storage.store import StoreKeyError


def test_overwrite_is_atomic(store: ArtifactStore):
    """A reader racing a writer sees one whole version or the other, never a mix."""
    versions = [b"a" * 1_000_000, b"b" * 1_000_000]
    store.write_bytes("x/data.bin", versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(store.read_bytes("x/data.bin"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(10):
            store.write_bytes("x/data.bin", versions[round_ % 2])
    finally:
        done.set()
        reader.join()
    assert seen
    assert all(data in versions for data in seen)
    store.write_bytes("x/data.bin", b"final")
    assert store.read_bytes("x/data.bin") == b"final"
    assert list(store.list_keys("x")) == ["x/data.bin"]  # no temporary object left behind


def test_exists_and_missing_keys(store: ArtifactStore):
    assert not store.exists("a/b.json")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/b.json")
    store.write_bytes("a/b.json", b"{}")
    assert store.exists("a/b.json")
    store.delete_prefix("a/b.json")
    assert not store.exists("a/b.json")


def test_list_is_sorted_by_path_and_scoped_to_the_prefix(store: ArtifactStore):
    for key in ["x/b", "x/a-1", "x/a/2", "x/.partial", "xy/3", "x/a/.tmp", "z"]:
        store.write_bytes(key, b".")
    # Sorted by components ("a" < "a-1"), as on a disk; names starting with "." are hidden.
    assert list(store.list_keys("x")) == ["x/a/2", "x/a-1", "x/b"]
    assert list(store.list_keys("x/a")) == ["x/a/2"]
    assert list(store.list_keys("missing")) == []


def test_sizes_are_what_staging_would_cost(store: ArtifactStore):
    store.write_bytes("x/a/1", b"1")
    store.write_bytes("x/.hidden", b"22")
    store.write_bytes("x/b", b"")
    store.write_bytes("xy/c", b"333")
    assert store.sizes("x") == {"a/1": 1, ".hidden": 2, "b": 0}
    assert store.sizes("missing") == {}


# Not on moto: its server shares this process's GIL and takes ~12 ms a request here,
# twice SeaweedFS's time; SeaweedFS pages and batches deletes like S3 does.
@pytest.mark.parametrize("store", ["filesystem", "seaweedfs"], indirect=True)
def test_more_than_a_thousand_keys(store: ArtifactStore):
    """Past one listing page and one delete batch (both 1000 on S3)."""
    count = 1050
    with store.local_dir("many", writable=True) as folder:
        for i in range(count):
            (folder / f"{i % 3}" / f"{i:05d}.txt").parent.mkdir(exist_ok=True)
            (folder / f"{i % 3}" / f"{i:05d}.txt").write_text(str(i))
    store.write_bytes("other/keep", b"k")
    keys = list(store.list_keys("many"))
    assert len(keys) == count
    assert keys == sorted(keys, key=lambda k: k.split("/"))
    assert store.read_bytes("many/2/01049.txt") == b"1049"
    store.delete_prefix("many")
    assert list(store.list_keys("many")) == []
    assert store.exists("other/keep")


def test_delete_prefix(store: ArtifactStore):
    for key in ["x/1", "x/y/2", "xz/3", "z/4"]:
        store.write_bytes(key, b".")
    store.delete_prefix("x")
    assert not store.exists("x/1")
    assert not store.exists("x/y/2")
    assert store.exists("xz/3")  # a sibling sharing the first letters is not under "x"
    assert store.exists("z/4")
    store.delete_prefix("never/there")


def test_local_dir_stages_what_is_stored(store: ArtifactStore):
    store.write_bytes("batch/files/r1/a.cif", b"data_1")
    store.write_bytes("batch/files/r2/deep/b.cif", b"data_2")
    store.write_bytes("batch/other.json", b"{}")
    with store.local_dir("batch/files", writable=False) as folder:
        staged = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert staged == ["r1/a.cif", "r2/deep/b.cif"]
        assert (folder / "r2/deep/b.cif").read_bytes() == b"data_2"
    with store.local_dir("batch/empty", writable=False) as folder:
        # Nothing stored there: an empty folder (the filesystem store yields none at all).
        assert not folder.exists() or list(folder.iterdir()) == []


def test_local_dir_writes_back_new_changed_and_removed_files(store: ArtifactStore):
    store.write_bytes("work/same-size.txt", b"old")
    store.write_bytes("work/keep.txt", b"keep")
    store.write_bytes("work/gone.txt", b"gone")
    store.write_bytes("work/sub/gone-too.txt", b"gone")
    big = os.urandom(30 * 1024 * 1024)  # above the multipart threshold: uploaded in parts
    with store.local_dir("work", writable=True) as folder:
        # Rewritten right after staging with the same size: must still count as changed.
        (folder / "same-size.txt").write_bytes(b"new")
        (folder / "gone.txt").unlink()
        (folder / "sub/gone-too.txt").unlink()
        (folder / "nested/deeper").mkdir(parents=True)
        (folder / "nested/deeper/out.jsonl").write_bytes(b'{"id": 1}\n')
        (folder / "big.bin").write_bytes(big)
    assert list(store.list_keys("work")) == [
        "work/big.bin",
        "work/keep.txt",
        "work/nested/deeper/out.jsonl",
        "work/same-size.txt",
    ]
    assert store.read_bytes("work/same-size.txt") == b"new"
    assert store.read_bytes("work/nested/deeper/out.jsonl") == b'{"id": 1}\n'
    assert hashlib.sha256(store.read_bytes("work/big.bin")).digest() == hashlib.sha256(big).digest()
    # Staged again, the big file comes back whole (downloaded in ranges on S3).
    with store.local_dir("work", writable=False) as folder:
        assert (folder / "big.bin").stat().st_size == len(big)
        assert (
            hashlib.sha256((folder / "big.bin").read_bytes()).digest()
            == hashlib.sha256(big).digest()
        )


def test_describe_names_the_key(store: ArtifactStore):
    where = store.describe("batches/p1/records.jsonl")
    assert where.endswith("batches/p1/records.jsonl")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../../b", ".."])
def test_keys_cannot_leave_the_store(store: ArtifactStore, key: str, tmp_path: Path):
    with pytest.raises(StoreKeyError):
        store.write_bytes(key, b"x")
    with pytest.raises(StoreKeyError):
        store.read_bytes(key)
    with pytest.raises(StoreKeyError):
        store.exists(key)
    with pytest.raises(StoreKeyError):
        list(store.list_keys(key))
    with pytest.raises(StoreKeyError):
        store.delete_prefix(key)
    with pytest.raises(StoreKeyError), store.local_dir(key, writable=True):
        pass


def test_checkpoints_round_trip(store: ArtifactStore):
    io = StoreCheckpointIO(store, "batches/p1/hooks/h/checkpoint.json")
    assert io.load() is None
    checkpoint = Checkpoint(hook="h", batch_digest="d" * 8, next_memory_mb=512)
    io.save(checkpoint)
    checkpoint.next_memory_mb = 1024
    checkpoint.anomalies["at"] = int(datetime.now(UTC).timestamp())
    io.save(checkpoint)
    assert io.load() == checkpoint


def test_an_unreadable_checkpoint_names_its_file_and_is_set_aside_intact(store: ArtifactStore):
    io = StoreCheckpointIO(store, "batches/p1/hooks/h/checkpoint.json")
    io.save(Checkpoint(hook="h", batch_digest="d" * 8, next_memory_mb=512))
    truncated = store.read_bytes(io.key)[:20]
    store.write_bytes(io.key, truncated)

    with pytest.raises(UnreadableState) as error:
        io.load()
    [line] = str(error.value).splitlines()
    assert store.describe(io.key) in line and "Invalid JSON: EOF" in line

    aside = io.set_aside()
    assert store.read_bytes(aside) == truncated  # kept as it was, for inspection
    assert list(store.list_keys("batches/p1/hooks/h")) == [aside]
    assert io.load() is None


def test_an_unreadable_memory_history_is_set_aside_and_learnt_again(
    store: ArtifactStore, caplog: pytest.LogCaptureFixture
):
    io = StoreMemoryHistoryIO(store, "history/c/h.json")
    store.write_bytes(io.key, b'{"hook": "h", "fits": [')

    assert io.load() is None
    [aside] = store.list_keys("history/c")
    assert aside.startswith(f"{io.key}.unreadable-")
    assert store.describe(aside) in caplog.text and "Invalid JSON" in caplog.text
