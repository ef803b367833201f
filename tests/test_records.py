import re
import threading
from pathlib import Path

from sqlalchemy import func, select

from osa_dagster.records import (
    Feature,
    FeatureRows,
    Record,
    RecordsDatabase,
    RecordToPublish,
    publish_records,
    store_features,
)

SRN = re.compile(r"^urn:osa:example\.org:rec:[0-9a-f-]{36}$")


def _db(tmp_path: Path) -> RecordsDatabase:
    return RecordsDatabase(f"sqlite:///{tmp_path / 'records.db'}")


def _publish(db, ids, partition="p1"):
    return publish_records(
        db,
        convention="pdb",
        domain="example.org",
        partition=partition,
        records=[RecordToPublish(i, {"id": i}) for i in ids],
    )


def _count(db, model) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_publish_is_idempotent_and_keeps_srns(tmp_path: Path):
    db = _db(tmp_path)
    first = _publish(db, ["1ABC", "2DEF"])
    assert first.newly_published == 2
    assert all(SRN.match(srn) for srn in first.srns.values())
    again = _publish(db, ["2DEF", "3GHI"], partition="p2")
    assert (again.newly_published, again.already_published) == (1, 1)
    assert again.srns["2DEF"] == first.srns["2DEF"]
    assert _count(db, Record) == 3


def test_same_source_id_in_two_conventions_is_two_records(tmp_path: Path):
    db = _db(tmp_path)
    _publish(db, ["X1"])
    other = publish_records(
        db,
        convention="uniprot",
        domain="example.org",
        partition="p",
        records=[RecordToPublish("X1", {})],
    )
    assert other.newly_published == 1


def test_concurrent_publishers_publish_each_record_once(tmp_path: Path):
    db_path = tmp_path / "records.db"
    assert RecordsDatabase(f"sqlite:///{db_path}").engine is not None  # creates the schema once
    ids = [f"R{n}" for n in range(200)]
    results = []

    def publisher() -> None:
        results.append(_publish(RecordsDatabase(f"sqlite:///{db_path}"), ids))

    threads = [threading.Thread(target=publisher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    db = RecordsDatabase(f"sqlite:///{db_path}")
    assert _count(db, Record) == 200
    assert sum(r.newly_published for r in results) == 200
    assert all(r.srns == results[0].srns for r in results)


def test_storing_features_twice_replaces_rows(tmp_path: Path):
    db = _db(tmp_path)
    srn = _publish(db, ["1ABC"]).srns["1ABC"]
    rows = [FeatureRows(srn, [{"atoms": 10}, {"atoms": 11}])]
    assert store_features(db, hook="features", features=rows) == 2
    assert store_features(db, hook="features", features=rows) == 2
    assert store_features(db, hook="other", features=[FeatureRows(srn, [{"a": 1}])]) == 1
    assert _count(db, Feature) == 3
    with db.session() as session:
        stored = session.scalars(
            select(Feature.data).where(Feature.hook == "features").order_by(Feature.row_index)
        ).all()
    assert stored == [{"atoms": 10}, {"atoms": 11}]


def test_dead_letters_are_replaced_per_partition_and_kept_once_per_record_and_hook(
    tmp_path: Path,
):
    from osa_dagster.records import PoisonRecord, list_dead_letters, replace_dead_letters

    db = _db(tmp_path)

    def poison(source_id: str, limit_mb: int = 256) -> PoisonRecord:
        return PoisonRecord(source_id, "parse", 240.0, limit_mb, 256.0, "poison: OOM alone")

    replace_dead_letters(db, convention="pdb", partition="p1", poison=[poison("3J3Q"), poison("X")])
    replace_dead_letters(db, convention="pdb", partition="p1", poison=[poison("3J3Q"), poison("X")])
    assert [(d.source_id, d.partition) for d in list_dead_letters(db, "pdb")] == [
        ("3J3Q", "p1"),
        ("X", "p1"),
    ]
    # The same record met again in a later batch: still one row, naming the later batch.
    replace_dead_letters(db, convention="pdb", partition="p2", poison=[poison("3J3Q", 512)])
    assert [(d.source_id, d.partition, d.limit_mb) for d in list_dead_letters(db, "pdb")] == [
        ("X", "p1", 256),
        ("3J3Q", "p2", 512),
    ]
    # p1 re-run with a higher cap: X passed, so its dead letter goes; p2's row stays.
    replace_dead_letters(db, convention="pdb", partition="p1", poison=[])
    assert [d.source_id for d in list_dead_letters(db, "pdb")] == ["3J3Q"]
    assert list_dead_letters(db, "uniprot") == []
