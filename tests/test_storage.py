from pathlib import Path

import pytest

from osa_dagster.storage import BatchLayout, FileSystemStore
from osa_dagster.storage.store import StoreKeyError


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path):
    store = FileSystemStore(tmp_path)
    store.write_bytes("a/b/c.json", b"one")
    store.write_bytes("a/b/c.json", b"two")
    assert store.read_bytes("a/b/c.json") == b"two"
    assert [p.name for p in (tmp_path / "a/b").iterdir()] == ["c.json"]


def test_list_and_delete_prefix(tmp_path: Path):
    store = FileSystemStore(tmp_path)
    for key in ["x/1", "x/y/2", "z/3"]:
        store.write_bytes(key, b".")
    assert list(store.list_keys("x")) == ["x/1", "x/y/2"]
    assert list(store.list_keys("missing")) == []
    store.delete_prefix("x")
    assert not store.exists("x/1")
    assert store.exists("z/3")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../../b", ".."])
def test_keys_cannot_leave_the_store(tmp_path: Path, key: str):
    with pytest.raises(StoreKeyError):
        FileSystemStore(tmp_path).write_bytes(key, b"x")


def test_layout_keys_are_distinct_per_batch_and_hook():
    a, b = BatchLayout("pdb", "p1"), BatchLayout("pdb", "p2")
    keys = {
        a.manifest,
        a.raw_records,
        a.checkpoint("h1", "1"),
        a.checkpoint("h1", "2"),
        a.checkpoint("h2", "1"),
        b.raw_records,
    }
    assert len(keys) == 6
    assert a.raw_records.startswith(a.raw + "/")
    assert a.checkpoint("h1", "1").startswith(a.hook("h1") + "/")
