"""The geo convention on real GEO records, and its E-utilities ingester against a fake NCBI.

Expected values come from the files themselves, read here with gzip and plain line tests
(counting `!Series_sample_id` lines, the rows between table markers), not from the reader
under test.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from osa_sdk.contract import BYTES_PER_MB, files_dir_for
from osa_sdk.runtime import run_ingest
from osa_sdk.types import HookRecord, IngesterRecord, RecordRef, Reject

from osa_dagster.conventions.geo import CONVENTIONS
from osa_dagster.conventions.geo.eutils import GeoEutilsIngester, family_soft_url, series_folder
from osa_dagster.conventions.geo.hooks import extract_features, validate_soft
from osa_dagster.conventions.geo.ingester import (
    DEFAULT_FOLDER,
    GeoFolderIngester,
    GeoRecordMetadata,
)
from osa_dagster.conventions.http import UpstreamError
from osa_dagster.settings import Settings
from tests.conventions.fake_upstream import FakeUpstream, ReceivedRequest, Reply

FILES = {
    "GDS507": DEFAULT_FOLDER / "GDS507.soft.gz",
    "GSE781": DEFAULT_FOLDER / "GSE781_family.soft.gz",
    "GSM11805": DEFAULT_FOLDER / "GSM11805.txt.gz",
}


def text_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
        return stream.read().splitlines()


def values(lines: list[str], key: str) -> list[str]:
    """Values of `!key = value` lines."""
    prefix = f"!{key} = "
    return [line[len(prefix) :].strip() for line in lines if line.startswith(prefix)]


def table_rows(lines: list[str], entity_line: str) -> int:
    """Data rows of the first table after `entity_line`, header row not counted."""
    start = lines.index(entity_line)
    begin = next(i for i in range(start, len(lines)) if lines[i].lower().endswith("_table_begin"))
    end = next(i for i in range(begin, len(lines)) if lines[i].lower().endswith("_table_end"))
    return end - begin - 2


def geo_day(text: str) -> date:
    return datetime.strptime(text, "%b %d %Y").date()


def hook_record(tmp_path: Path, accession: str, file: Path, name: str | None = None) -> HookRecord:
    folder = tmp_path / "files" / files_dir_for(accession)
    folder.mkdir(parents=True)
    shutil.copy(file, folder / (name or file.name))
    return HookRecord(id=accession, files_dir=files_dir_for(accession)).bind_files_root(
        tmp_path / "files"
    )


def gzip_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=1))
    return path


# --- the bundled records --------------------------------------------------------------------


def test_bundled_records_are_the_real_geo_files() -> None:
    assert sorted(p.name for p in DEFAULT_FOLDER.iterdir() if p.suffix == ".gz") == sorted(
        p.name for p in FILES.values()
    )
    for accession, path in FILES.items():
        first = next(
            line for line in text_lines(path) if line.startswith("^") and "DATABASE" not in line
        )
        assert first.endswith(f"= {accession}")
    assert sum(p.stat().st_size for p in FILES.values()) < 12e6
    assert (DEFAULT_FOLDER / "SOURCES.md").is_file()


def test_convention_is_named_geo_with_both_hooks() -> None:
    (convention,) = CONVENTIONS
    assert convention.name == "geo"
    assert [h.name for h in convention.hooks] == ["validate_soft", "extract_features"]
    assert convention.record_schema is GeoRecordMetadata


# --- local discover and fetch -----------------------------------------------------------------


def test_discover_lists_every_record_by_accession() -> None:
    refs = list(GeoFolderIngester().discover(None, None))
    assert [r.source_id for r in refs] == ["GDS507", "GSE781", "GSM11805"]
    assert [r.extra["path"] for r in refs] == [FILES[r.source_id].name for r in refs]
    assert refs[1].size_hint_mb == pytest.approx(FILES["GSE781"].stat().st_size / BYTES_PER_MB)
    assert [r.source_id for r in GeoFolderIngester().discover(None, 2)] == ["GDS507", "GSE781"]


def test_discover_since_compares_file_times_and_skips_what_is_not_soft(tmp_path: Path) -> None:
    folder = tmp_path / "mirror"
    (folder / "old").mkdir(parents=True)
    shutil.copy(FILES["GSM11805"], folder / "old" / "GSM11805.txt.gz")
    shutil.copy(FILES["GDS507"], folder / "GDS507.soft.gz")
    (folder / "README.txt").write_text("not a SOFT file\n")
    (folder / ".GSE1.soft.gz.partial").write_bytes(b"")
    now = datetime.now(UTC)
    old = (now - timedelta(days=10)).timestamp()
    os.utime(folder / "old" / "GSM11805.txt.gz", (old, old))
    ingester = GeoFolderIngester(folder)
    assert [r.source_id for r in ingester.discover(None, None)] == ["GDS507", "GSM11805"]
    recent = [r.source_id for r in ingester.discover(now - timedelta(days=1), None)]
    assert recent == ["GDS507"]
    assert list(ingester.discover(now + timedelta(days=1), None)) == []


def test_discover_skips_a_second_file_of_one_accession_and_what_is_not_a_record(
    tmp_path: Path,
) -> None:
    shutil.copy(FILES["GSM11805"], tmp_path / "GSM11805.txt.gz")
    shutil.copy(FILES["GDS507"], tmp_path / "GDS507.soft.gz")
    (tmp_path / "more").mkdir()
    copy = tmp_path / "more" / "copy.soft"
    copy.write_bytes(gzip.decompress(FILES["GSM11805"].read_bytes()))
    (tmp_path / "cut.soft.gz").write_bytes(FILES["GDS507"].read_bytes()[:10])
    ingester = GeoFolderIngester(tmp_path)
    refs = list(ingester.discover(None, None))
    # Path order decides which file of the accession is kept, the same at every plan.
    assert [(r.source_id, r.extra["path"]) for r in refs] == [
        ("GDS507", "GDS507.soft.gz"),
        ("GSM11805", "GSM11805.txt.gz"),
    ]
    skipped = {s.where: s.reason for s in ingester.skipped}
    assert skipped.keys() == {"more/copy.soft", "cut.soft.gz"}
    assert skipped["more/copy.soft"] == "GSM11805 is in GSM11805.txt.gz already, which is kept"
    assert skipped["cut.soft.gz"].startswith("not a readable GEO SOFT record")


def test_fetch_copies_files_as_they_are_with_header_metadata(tmp_path: Path) -> None:
    ingester = GeoFolderIngester()
    refs = list(ingester.discover(None, None))
    report = run_ingest(ingester, refs, tmp_path / "out")
    assert report.records == 3 and not report.failed
    lines_out = (tmp_path / "out/records.jsonl").read_text().splitlines()
    records = {line["source_id"]: line for line in map(json.loads, lines_out)}
    for accession, path in FILES.items():
        copied = tmp_path / "out/files" / files_dir_for(accession) / path.name
        assert (
            hashlib.sha256(copied.read_bytes()).digest()
            == hashlib.sha256(path.read_bytes()).digest()
        )

    series = GeoRecordMetadata.model_validate(records["GSE781"]["metadata"])
    lines = text_lines(FILES["GSE781"])
    assert series.kind == "series"
    assert series.sample_count == len(values(lines, "Series_sample_id")) == 34
    assert series.platforms == values(lines, "Series_platform_id")
    assert series.submission_date == geo_day(values(lines, "Series_submission_date")[0])
    assert series.title == values(lines, "Series_title")[0]
    assert series.organisms == sorted(set(values(lines, "Platform_organism")))
    assert series.source == "GSE781_family.soft.gz"

    dataset = GeoRecordMetadata.model_validate(records["GDS507"]["metadata"])
    gds = text_lines(FILES["GDS507"])
    assert dataset.kind == "dataset"
    assert dataset.sample_count == int(values(gds, "dataset_sample_count")[0])
    assert dataset.platforms == values(gds, "dataset_platform")
    assert dataset.submission_date is None

    sample = GeoRecordMetadata.model_validate(records["GSM11805"]["metadata"])
    gsm = text_lines(FILES["GSM11805"])
    assert sample.platforms == values(gsm, "Sample_platform_id")
    assert sample.organisms == values(gsm, "Sample_organism_ch1")


def test_fetch_fails_only_the_record_whose_file_is_gone(tmp_path: Path) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    for path in (FILES["GSM11805"], FILES["GDS507"]):
        shutil.copy(path, folder / path.name)
    ingester = GeoFolderIngester(folder)
    refs = list(ingester.discover(None, None))
    (folder / "GDS507.soft.gz").unlink()
    report = run_ingest(ingester, refs, tmp_path / "out")
    assert report.records == 1
    assert [f.source_id for f in report.failed] == ["GDS507"]
    assert "no longer exists" in report.failed[0].error


# --- hooks ------------------------------------------------------------------------------------


def test_features_of_the_series_agree_with_its_own_lines(tmp_path: Path) -> None:
    features = extract_features(hook_record(tmp_path, "GSE781", FILES["GSE781"]))
    lines = text_lines(FILES["GSE781"])
    samples = values(lines, "Series_sample_id")
    assert features["samples"] == samples
    assert features["sample_count"] == len(samples)
    assert features["platforms"] == ["GPL96", "GPL97"]
    assert features["organisms"] == ["Homo sapiens"]
    assert (
        features["submission_date"]
        == geo_day(values(lines, "Series_submission_date")[0]).isoformat()
    )
    assert features["pubmed_ids"] == values(lines, "Series_pubmed_id")
    expected_rows = sum(
        table_rows(lines, line) for line in lines if line.startswith(("^PLATFORM", "^SAMPLE"))
    )
    assert features["table_rows"] == expected_rows


def test_features_of_the_dataset_and_the_sample(tmp_path: Path) -> None:
    dataset = extract_features(hook_record(tmp_path / "d", "GDS507", FILES["GDS507"]))
    gds = text_lines(FILES["GDS507"])
    header = gds[next(i for i, line in enumerate(gds) if line == "!dataset_table_begin") + 1]
    assert dataset["samples"] == [c for c in header.split("\t") if c.startswith("GSM")]
    assert dataset["sample_count"] == int(values(gds, "dataset_sample_count")[0]) == 17
    assert dataset["table_rows"] == int(values(gds, "dataset_feature_count")[0])
    assert dataset["last_update_date"] == geo_day(values(gds, "dataset_update_date")[0]).isoformat()

    sample = extract_features(hook_record(tmp_path / "s", "GSM11805", FILES["GSM11805"]))
    gsm = text_lines(FILES["GSM11805"])
    assert sample["kind"] == "sample"
    assert sample["samples"] == ["GSM11805"]
    assert sample["table_rows"] == table_rows(gsm, "^SAMPLE = GSM11805")
    assert sample["table_rows"] == int(values(gsm, "Sample_data_row_count")[0])


@pytest.mark.parametrize("accession", sorted(FILES))
def test_every_bundled_record_passes_validation(tmp_path: Path, accession: str) -> None:
    assert validate_soft(hook_record(tmp_path, accession, FILES[accession])) is None


def test_a_truncated_gzip_is_rejected(tmp_path: Path) -> None:
    data = FILES["GSM11805"].read_bytes()
    cut = tmp_path / "GSM11805.txt.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(Reject, match="damaged or truncated") as caught:
        validate_soft(hook_record(tmp_path, "GSM11805", cut))
    assert "GSM11805.txt.gz cannot be read as GEO SOFT" in caught.value.reason


def test_a_table_missing_a_row_is_rejected(tmp_path: Path) -> None:
    lines = text_lines(FILES["GSM11805"])
    begin = lines.index("!sample_table_begin")
    del lines[begin + 100]
    damaged = gzip_lines(tmp_path / "GSM11805.txt.gz", lines)
    with pytest.raises(Reject) as caught:
        extract_features(hook_record(tmp_path, "GSM11805", damaged))
    assert "has 22282 rows but !Sample_data_row_count says 22283" in caught.value.reason


def test_a_row_with_an_extra_field_is_rejected_with_its_line(tmp_path: Path) -> None:
    lines = text_lines(FILES["GSM11805"])
    begin = lines.index("!sample_table_begin")
    lines[begin + 5] += "\textra"
    damaged = gzip_lines(tmp_path / "GSM11805.txt.gz", lines)
    with pytest.raises(Reject) as caught:
        validate_soft(hook_record(tmp_path, "GSM11805", damaged))
    assert f"line {begin + 6}: row 4 of the table of GSM11805 has 4 fields" in caught.value.reason


def test_a_text_file_cut_inside_a_table_is_rejected(tmp_path: Path) -> None:
    lines = text_lines(FILES["GSM11805"])
    cut = tmp_path / "GSM11805.txt"
    cut.write_text("\n".join(lines[:5000]) + "\n")
    with pytest.raises(Reject, match=r"ends inside the table of GSM11805 .* truncated"):
        validate_soft(hook_record(tmp_path, "GSM11805", cut))


def test_a_family_file_missing_samples_is_rejected(tmp_path: Path) -> None:
    lines = text_lines(FILES["GSE781"])
    samples = [i for i, line in enumerate(lines) if line.startswith("^SAMPLE")]
    kept = gzip_lines(tmp_path / "GSE781_family.soft.gz", lines[: samples[30]])
    with pytest.raises(Reject, match="4 platforms or samples that the family file does not hold"):
        validate_soft(hook_record(tmp_path, "GSE781", kept))


def test_a_file_of_another_record_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(Reject, match="is the record of GSM11805, not of GSM1"):
        validate_soft(hook_record(tmp_path, "GSM1", FILES["GSM11805"]))


def test_a_record_without_a_soft_file_is_rejected(tmp_path: Path) -> None:
    record = hook_record(tmp_path, "GSM11805", FILES["GSM11805"], name="GSM11805.cel")
    with pytest.raises(Reject, match=r"no SOFT file .* GSM11805\.cel"):
        validate_soft(record)


# --- E-utilities ------------------------------------------------------------------------------


SERIES = [f"GSE{n}" for n in (781, 1001, 12345, 20000, 99)]


def fake_ncbi(upstream: FakeUpstream, series: list[str] = SERIES) -> None:
    """esearch and esummary of a history-server result holding `series`, in that order."""
    uids = [str(200000000 + int(acc[3:])) for acc in series]
    upstream.route(
        "/eutils/esearch.fcgi",
        Reply.json(
            {
                "esearchresult": {
                    "count": str(len(series)),
                    "retmax": "0",
                    "retstart": "0",
                    "querykey": "1",
                    "webenv": "MCID_fake",
                    "idlist": [],
                }
            }
        ),
    )

    def esummary(request: ReceivedRequest) -> Reply:
        assert (request.param("WebEnv"), request.param("query_key")) == ("MCID_fake", "1")
        start, size = int(request.param("retstart") or 0), int(request.param("retmax") or 20)
        page = uids[start : start + size]
        result: dict[str, object] = {"uids": page}
        for uid, acc in zip(page, series[start : start + size], strict=True):
            result[uid] = {"uid": uid, "accession": acc, "entrytype": "GSE", "pdat": "2003/11/25"}
        return Reply.json({"header": {"type": "esummary"}, "result": result})

    upstream.route("/eutils/esummary.fcgi", esummary)


def eutils_ingester(upstream: FakeUpstream, **config: object) -> GeoEutilsIngester:
    return GeoEutilsIngester(
        eutils_base=upstream.url("/eutils"), ftp_base=upstream.url("/geo"), **config
    )


def test_series_folders_follow_geo_layout() -> None:
    assert series_folder("GSE781") == "GSEnnn"
    assert series_folder("GSE12345") == "GSE12nnn"
    assert series_folder("GSE1") == "GSEnnn"
    assert (
        family_soft_url("https://ftp.ncbi.nlm.nih.gov/geo/", "GSE12345")
        == "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE12nnn/GSE12345/soft/GSE12345_family.soft.gz"
    )
    with pytest.raises(ValueError, match="not a GEO series"):
        series_folder("GDS507")


def test_discover_pages_through_the_history_server_at_three_requests_per_second(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NCBI_API_KEY", raising=False)
    fake_ncbi(fake_upstream)
    refs = list(eutils_ingester(fake_upstream, page_size=2).discover(None, None))
    assert [r.source_id for r in refs] == SERIES
    assert refs[0].extra["gds_uid"] == "200000781"
    (search,) = fake_upstream.requests("/eutils/esearch.fcgi")
    assert search.param("db") == "gds" and search.param("usehistory") == "y"
    assert search.param("term") == "gse[ETYP]"
    assert search.param("mindate") is None
    pages = fake_upstream.requests("/eutils/esummary.fcgi")
    assert [(p.param("retstart"), p.param("retmax")) for p in pages] == [
        ("0", "2"),
        ("2", "2"),
        ("4", "1"),
    ]
    assert all("api_key" not in r.query for r in fake_upstream.requests())
    times = [r.at for r in fake_upstream.requests()]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # The server stamps a request when it reads it, which a busy machine can delay a little,
    # shortening the gap after it: each gap gets some slack, their sum little. Unthrottled
    # requests would be milliseconds apart.
    assert min(gaps) >= 1 / 3 - 0.1, gaps
    assert times[-1] - times[0] >= (len(times) - 1) / 3 - 0.05, gaps


def test_discover_honours_limit_and_since(fake_upstream: FakeUpstream) -> None:
    fake_ncbi(fake_upstream)
    since = datetime(2024, 3, 5, 23, 30, tzinfo=UTC)
    refs = list(eutils_ingester(fake_upstream, page_size=2).discover(since, 3))
    assert [r.source_id for r in refs] == SERIES[:3]
    (search,) = fake_upstream.requests("/eutils/esearch.fcgi")
    assert (search.param("datetype"), search.param("mindate"), search.param("maxdate")) == (
        "pdat",
        "2024/03/05",
        "3000",
    )
    assert len(fake_upstream.requests("/eutils/esummary.fcgi")) == 2


def test_an_api_key_goes_to_eutils_only_and_raises_the_rate(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NCBI_API_KEY", "secret-key")
    fake_ncbi(fake_upstream, ["GSE781"])
    fake_upstream.route(
        "/geo/series/GSEnnn/GSE781/soft/GSE781_family.soft.gz", Reply.file(FILES["GSM11805"])
    )
    ingester = eutils_ingester(fake_upstream)
    assert "secret-key" not in repr(ingester.config)
    refs = list(ingester.discover(None, None))
    run_ingest(ingester, refs, tmp_path / "out")
    eutils = [r for r in fake_upstream.requests() if r.path.startswith("/eutils/")]
    assert [r.param("api_key") for r in eutils] == ["secret-key", "secret-key"]
    (download,) = fake_upstream.requests("/geo/series/GSEnnn/GSE781/soft/GSE781_family.soft.gz")
    assert "api_key" not in download.query
    times = [r.at for r in fake_upstream.requests()]
    assert times[-1] - times[0] >= (len(times) - 1) / 10 - 0.05


def test_discover_waits_out_a_429(fake_upstream: FakeUpstream) -> None:
    fake_ncbi(fake_upstream, ["GSE781"])
    good = Reply.json(
        {"esearchresult": {"count": "1", "querykey": "1", "webenv": "MCID_fake", "idlist": []}}
    )
    fake_upstream.route(
        "/eutils/esearch.fcgi", [Reply.text("slow down", 429, headers={"Retry-After": "1"}), good]
    )
    refs = list(eutils_ingester(fake_upstream).discover(None, None))
    assert [r.source_id for r in refs] == ["GSE781"]
    first, second = fake_upstream.requests("/eutils/esearch.fcgi")
    assert second.at - first.at >= 1.0 - 0.05


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (Reply.text("<html>Bad Gateway</html>"), "not JSON"),
        (Reply.json({"esearchresult": {"count": "3", "querykey": "1"}}), "no esearchresult.webenv"),
        (Reply.json({"esearchresult": {"ERROR": "Invalid query"}}), "E-utilities error: Invalid"),
        (Reply.json({"esearchresult": {"count": "many"}}), "count is not a number"),
    ],
)
def test_a_malformed_answer_fails_discover_naming_the_url(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, reply: Reply, problem: str
) -> None:
    monkeypatch.setenv("NCBI_API_KEY", "secret-key")
    fake_upstream.route("/eutils/esearch.fcgi", reply)
    with pytest.raises(UpstreamError) as caught:
        list(eutils_ingester(fake_upstream).discover(None, None))
    message = str(caught.value)
    assert problem in message
    assert fake_upstream.url("/eutils/esearch.fcgi") in message
    assert "secret-key" not in message


def test_an_esummary_page_without_records_fails_discover(fake_upstream: FakeUpstream) -> None:
    fake_ncbi(fake_upstream)
    fake_upstream.route("/eutils/esummary.fcgi", Reply.json({"result": {"uids": []}}))
    with pytest.raises(UpstreamError, match=r"esummary\.fcgi.*retstart=0 returned no UIDs"):
        list(eutils_ingester(fake_upstream).discover(None, None))


def test_fetch_downloads_family_files_and_errors_only_a_404(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    path = "/geo/series/GSEnnn/GSE781/soft/GSE781_family.soft.gz"
    data = FILES["GSE781"].read_bytes()
    # The first answer is cut short: the client must retry and keep only a whole file.
    fake_upstream.route(
        path,
        [
            Reply(
                200,
                data,
                headers={"Last-Modified": "Sun, 29 May 2005 10:00:00 GMT"},
                truncate_at=4096,
            ),
            Reply(200, data, headers={"Last-Modified": "Sun, 29 May 2005 10:00:00 GMT"}),
        ],
    )
    refs = [RecordRef(source_id="GSE781"), RecordRef(source_id="GSE1")]
    report = run_ingest(eutils_ingester(fake_upstream), refs, tmp_path / "out")
    assert report.records == 1
    assert [f.source_id for f in report.failed] == ["GSE1"]
    assert "GSEnnn/GSE1/soft/GSE1_family.soft.gz" in report.failed[0].error
    stored = tmp_path / "out/files" / files_dir_for("GSE781") / "GSE781_family.soft.gz"
    assert stored.read_bytes() == data
    assert len(fake_upstream.requests(path)) == 2
    (line,) = (tmp_path / "out/records.jsonl").read_text().splitlines()
    metadata = GeoRecordMetadata.model_validate(IngesterRecord.model_validate_json(line).metadata)
    assert metadata.sample_count == 34
    assert metadata.source == fake_upstream.url(path)
    assert metadata.source_modified_at == datetime(2005, 5, 29, 10, tzinfo=UTC)


def test_osa_sources_switches_geo_to_ncbi_with_the_same_hooks(monkeypatch) -> None:
    from osa_dagster.conventions.registry import ConventionError, load_conventions

    assert load_conventions(Settings.from_env())["geo"].ingester is GeoFolderIngester
    monkeypatch.setenv("OSA_SOURCES", "geo=ncbi")
    geo = load_conventions(Settings.from_env())["geo"]
    assert (geo.ingester, geo.source) == (GeoEutilsIngester, "ncbi")
    assert geo.hooks == CONVENTIONS[0].hooks
    monkeypatch.setenv("OSA_SOURCES", "geo=ftp")
    with pytest.raises(
        ConventionError,
        match=r"geo: 'ftp' is not one of its sources \['folder', 'ncbi'\], nor a folder or file",
    ):
        load_conventions(Settings.from_env())
    monkeypatch.setenv("OSA_SOURCES", "nosuch=ncbi")
    with pytest.raises(ConventionError, match="conventions that do not exist"):
        load_conventions(Settings.from_env())
