"""The RCSB API ingester against a fake RCSB on 127.0.0.1 that serves the bundled mirror's
real mmCIF files, through the ingester alone and through the whole Dagster asset graph.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from email.utils import format_datetime
from pathlib import Path

import dagster as dg
import gemmi
import pytest
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.runtime import run_ingest
from osa_sdk.types import IngesterRecord, RecordRef
from sqlalchemy import select

from osa_dagster.conventions.http import UpstreamError
from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, PdbEntryMetadata, entry_path
from osa_dagster.conventions.pdb.rcsb import RcsbIngester
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from tests.conventions.fake_upstream import FakeUpstream, ReceivedRequest, Reply
from tests.fixtures.pdb_api_convention import (
    FILES_PATH,
    HOLDINGS_PATH,
    SEARCH_PATH,
    UPSTREAM_URL_ENV,
)
from tests.test_pdb_end_to_end import expected_publishable

REPO = Path(__file__).resolve().parents[2]

# Small real entries of the bundled mirror (1OSM is one the hooks reject), and the date
# each was last changed in our fake RCSB's search index.
SERVED = {
    "1LZH": date(2020, 1, 5),
    "1YJP": date(2021, 3, 1),
    "7ETN": date(2021, 7, 9),
    "1OSM": date(2022, 2, 2),
    "1ORC": date(2022, 11, 30),
    "5I55": date(2023, 4, 4),
    "3JQH": date(2023, 6, 1),
    "1UBI": date(2024, 1, 15),
}
# Listed by holdings and search, but its file is gone (obsoleted after the listing).
MISSING = "9ZZZ"
FILE_LAST_MODIFIED = datetime(2024, 12, 4, 0, 0, 5, tzinfo=UTC)


class FakeRcsb:
    """RCSB's holdings, search and file services as they answer, on a FakeUpstream."""

    def __init__(self, upstream: FakeUpstream, changed: dict[str, date], missing: str) -> None:
        self.upstream = upstream
        self.changed = {**changed, missing: date(2024, 6, 1)}
        self.missing = missing
        upstream.route(HOLDINGS_PATH, Reply.json(sorted(self.changed), gzip=True))
        upstream.route(SEARCH_PATH, self.search, method="POST")
        upstream.route(FILES_PATH + "/", self.file, prefix=True)

    def ingester(self, **config) -> RcsbIngester:
        return RcsbIngester(
            holdings_url=self.upstream.url(HOLDINGS_PATH),
            search_url=self.upstream.url(SEARCH_PATH),
            files_url=self.upstream.url(FILES_PATH),
            **{"backoff_base_s": 0.01, **config},
        )

    def search(self, request: ReceivedRequest) -> Reply:
        query = request.json()
        after = datetime.fromisoformat(query["query"]["nodes"][0]["parameters"]["value"])
        hits = sorted((day, pdb_id) for pdb_id, day in self.changed.items() if day > after.date())
        if not hits:
            return Reply(204)
        paginate = query["request_options"]["paginate"]
        page = hits[paginate["start"] : paginate["start"] + paginate["rows"]]
        return Reply.json(
            {
                "query_id": "4b1c3d2e",
                "result_type": "entry",
                "total_count": len(hits),
                "result_set": [{"identifier": pdb_id, "score": 1.0} for _, pdb_id in page],
            }
        )

    def file(self, request: ReceivedRequest) -> Reply:
        name = request.path.rsplit("/", 1)[-1]
        path = entry_path(DEFAULT_MIRROR, name.removesuffix(".cif.gz"))
        if not name.endswith(".cif.gz") or not path.is_file():
            return Reply(404, b"<html><body>404 Not Found</body></html>")
        headers = {"Last-Modified": format_datetime(FILE_LAST_MODIFIED, usegmt=True)}
        return Reply.file(path, "application/octet-stream", headers=headers)


@pytest.fixture
def rcsb(fake_upstream) -> FakeRcsb:
    return FakeRcsb(fake_upstream, SERVED, MISSING)


def ids(refs) -> list[str]:
    return [ref.source_id for ref in refs]


# --- discover ---------------------------------------------------------------------------


def test_discover_all_lists_the_holdings_in_id_order(rcsb):
    assert ids(rcsb.ingester().discover(None, None)) == sorted([*SERVED, MISSING])
    assert ids(rcsb.ingester().discover(None, 3)) == sorted([*SERVED, MISSING])[:3]


def test_discover_since_pages_through_the_search_api(rcsb):
    since = datetime(2021, 6, 1)
    expected = [i for _, i in sorted((d, i) for i, d in rcsb.changed.items() if d > since.date())]
    assert len(expected) == 7
    assert ids(rcsb.ingester(page_rows=3).discover(since, None)) == expected

    requests = rcsb.upstream.requests(SEARCH_PATH)
    assert [r.json()["request_options"]["paginate"] for r in requests] == [
        {"start": 0, "rows": 3},
        {"start": 3, "rows": 3},
        {"start": 6, "rows": 3},
    ]
    query = requests[0].json()
    assert query["return_type"] == "entry"
    conditions = {
        node["parameters"]["attribute"]: (
            node["parameters"]["operator"],
            node["parameters"]["value"],
        )
        for node in query["query"]["nodes"]
    }
    assert conditions["rcsb_accession_info.revision_date"] == ("greater", "2021-06-01T00:00:00Z")
    assert query["query"]["logical_operator"] == "or"


def test_discover_since_stops_paging_at_the_limit(rcsb):
    assert len(ids(rcsb.ingester(page_rows=2).discover(datetime(2000, 1, 1), 3))) == 3
    assert len(rcsb.upstream.requests(SEARCH_PATH)) == 2


def test_discover_since_with_no_hits_is_empty(rcsb):
    # The Search API answers 204 No Content, not an empty result set.
    assert ids(rcsb.ingester().discover(datetime(2030, 1, 1, tzinfo=UTC), None)) == []


def test_malformed_holdings_fail_discover_naming_the_url(rcsb):
    rcsb.upstream.route(HOLDINGS_PATH, Reply.json({"entry_ids": ["1ABC"]}))
    with pytest.raises(UpstreamError, match="expected a JSON list of PDB entry ids") as raised:
        list(rcsb.ingester().discover(None, None))
    assert rcsb.upstream.url(HOLDINGS_PATH) in str(raised.value)


def test_holdings_with_a_path_in_an_id_are_refused(rcsb):
    rcsb.upstream.route(HOLDINGS_PATH, Reply.json(["1ABC", "../../etc"]))
    with pytest.raises(UpstreamError, match=r"ids: 1: String should match pattern"):
        list(rcsb.ingester().discover(None, None))


@pytest.mark.parametrize(
    "answer",
    [
        Reply(200, b'{"total_count": 3, "result_set": [{"identif', {"Content-Type": "text/json"}),
        Reply.json({"total_count": 3, "result_set": [{"id": "1ABC"}]}),
    ],
    ids=["truncated-json", "wrong-shape"],
)
def test_malformed_search_answers_fail_discover_naming_the_url(rcsb, answer):
    rcsb.upstream.route(SEARCH_PATH, answer, method="POST")
    with pytest.raises(UpstreamError) as raised:
        list(rcsb.ingester().discover(datetime(2020, 1, 1), None))
    assert rcsb.upstream.url(SEARCH_PATH) in str(raised.value)


def test_search_429_is_honoured_then_paging_goes_on(rcsb):
    real_search = rcsb.search
    answers = iter([Reply(429, headers={"Retry-After": "1"})])
    rcsb.upstream.route(
        SEARCH_PATH, lambda request: next(answers, None) or real_search(request), method="POST"
    )
    found = ids(rcsb.ingester(page_rows=4).discover(datetime(2000, 1, 1), None))
    assert len(found) == len(rcsb.changed)
    first, retried, *later_pages = rcsb.upstream.requests(SEARCH_PATH)
    assert len(later_pages) == 2  # 9 hits in pages of 4
    assert retried.at - first.at >= 1.0
    assert first.body == retried.body


# --- fetch ------------------------------------------------------------------------------


def ingest(ingester: RcsbIngester, pdb_ids: list[str], out: Path):
    report = run_ingest(ingester, [RecordRef(source_id=i) for i in pdb_ids], out)
    lines = (out / "records.jsonl").read_text().splitlines()
    return report, {r.source_id: r for r in map(IngesterRecord.model_validate_json, lines)}


def test_fetch_stores_real_files_and_their_header_and_a_404_fails_only_its_record(rcsb, tmp_path):
    wanted = ["1LZH", MISSING, "1UBI", "1OSM"]
    report, records = ingest(rcsb.ingester(), wanted, tmp_path / "batch")

    assert sorted(records) == ["1LZH", "1OSM", "1UBI"]
    [failed] = report.failed
    assert failed.source_id == MISSING
    assert rcsb.upstream.url(f"{FILES_PATH}/{MISSING}.cif.gz") in failed.error
    assert "404" in failed.error

    for pdb_id, record in records.items():
        mirror_file = entry_path(DEFAULT_MIRROR, pdb_id)
        [file] = record.files
        stored = tmp_path / "batch" / "files" / record.files_dir / file.path
        assert stored.read_bytes() == mirror_file.read_bytes()  # gzip kept as sent
        assert file.size_mb == mirror_file.stat().st_size / BYTES_PER_MB

        metadata = PdbEntryMetadata.model_validate(record.metadata)
        assert metadata.pdb_id == pdb_id
        assert metadata.source_path == f"{pdb_id}.cif.gz"
        assert metadata.source_modified_at == FILE_LAST_MODIFIED
        if pdb_id == "1OSM":
            continue  # a damaged gzip stream, which gemmi refuses to read whole
        block = gemmi.cif.read(str(mirror_file)).sole_block()
        assert metadata.title == gemmi.cif.as_string(block.find_value("_struct.title"))
        assert metadata.methods == [
            gemmi.cif.as_string(m) for m in block.find_values("_exptl.method")
        ]


def test_fetch_retries_a_truncated_file_and_a_429(rcsb, tmp_path):
    good = rcsb.file
    scripted = {
        "1LZH": iter([Reply(429, headers={"Retry-After": "1"})]),
        "1UBI": iter(
            [Reply(200, entry_path(DEFAULT_MIRROR, "1UBI").read_bytes(), truncate_at=4000)]
        ),
    }

    def file(request: ReceivedRequest) -> Reply:
        pdb_id = request.path.rsplit("/", 1)[-1].removesuffix(".cif.gz")
        return next(scripted.get(pdb_id, iter(())), None) or good(request)

    rcsb.upstream.route(FILES_PATH + "/", file, prefix=True)
    report, records = ingest(rcsb.ingester(), ["1LZH", "1UBI"], tmp_path / "batch")

    assert sorted(records) == ["1LZH", "1UBI"] and not report.failed
    stored = tmp_path / "batch" / "files" / records["1UBI"].files_dir / "1ubi.cif.gz"
    assert stored.read_bytes() == entry_path(DEFAULT_MIRROR, "1UBI").read_bytes()
    first, retried = rcsb.upstream.requests(f"{FILES_PATH}/1LZH.cif.gz")
    assert retried.at - first.at >= 1.0
    assert len(rcsb.upstream.requests(f"{FILES_PATH}/1UBI.cif.gz")) == 2


def test_fetch_keeps_the_per_host_rate_across_its_threads(rcsb, tmp_path):
    pdb_ids = list(SERVED)
    started = time.monotonic()
    _, records = ingest(
        rcsb.ingester(requests_per_second=10, download_threads=4), pdb_ids, tmp_path / "b"
    )
    assert len(records) == len(pdb_ids)
    times = sorted(r.at for r in rcsb.upstream.requests() if r.path.startswith(FILES_PATH))
    assert times[0] >= started
    # The limiter spaces sends 0.1 s apart. Arrivals at this in-process server jitter
    # around them (a few can bunch up on a loaded machine), so the check is on their span,
    # with one interval of slack; without a limiter all 8 arrive within a few ms.
    assert times[-1] - times[0] >= (len(times) - 2) * 0.1


def test_a_failing_file_server_fails_the_batch_naming_the_url(rcsb, tmp_path):
    rcsb.upstream.route(FILES_PATH + "/", Reply(503), prefix=True)
    with pytest.raises(UpstreamError, match=r"/download/1LZH\.cif\.gz: HTTP 503"):
        ingest(rcsb.ingester(max_attempts=2), ["1LZH"], tmp_path / "batch")


# --- the whole asset graph ----------------------------------------------------------------


@pytest.fixture
def pdb_api_convention(monkeypatch) -> Iterator[FakeRcsb]:
    with FakeUpstream() as upstream:
        monkeypatch.setenv(UPSTREAM_URL_ENV, upstream.base_url)
        monkeypatch.setenv("OSA_CONVENTIONS", "tests.fixtures.pdb_api_convention")
        monkeypatch.setenv("PYTHONPATH", str(REPO))
        yield FakeRcsb(upstream, SERVED, MISSING)
        assert not upstream.errors


@pytest.mark.slow
def test_the_asset_graph_publishes_entries_fetched_through_the_api(pdb_api_convention, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        defs = build_definitions()
        planned = defs.resolve_job_def("pdb_api_plan").execute_in_process(instance=instance)
        assert planned.success
        keys = instance.get_dynamic_partitions("pdb_api_batches")
        assert len(keys) == 3  # 9 ids in batches of 4
        job = defs.resolve_job_def("pdb_api_ingest")
        results = [job.execute_in_process(partition_key=k, instance=instance) for k in keys]
    assert all(result.success for result in results)

    fetch_failed = [
        event.materialization.metadata["fetch_failed"].value
        for result in results
        for event in result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey(["pdb_api", "raw_batch"])
    ]
    assert sorted(fetch_failed) == [0, 0, 1]

    expected = {i for i in SERVED if expected_publishable(entry_path(DEFAULT_MIRROR, i))}
    assert "1OSM" not in expected and len(expected) == len(SERVED) - 1
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session:
        published = set(
            session.scalars(select(Record.source_id).where(Record.convention == "pdb_api"))
        )
        features = dict(
            session.execute(
                select(Record.source_id, Feature.data)
                .join(Feature, Feature.record_srn == Record.srn)
                .where(Record.convention == "pdb_api", Feature.hook == "extract_features")
            ).all()
        )
    assert published == expected
    assert set(features) == expected
    for pdb_id in expected:
        structure = gemmi.read_structure(str(entry_path(DEFAULT_MIRROR, pdb_id)))
        assert features[pdb_id]["atoms"] == structure[0].count_atom_sites(), pdb_id
