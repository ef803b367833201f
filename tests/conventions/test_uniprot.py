"""The uniprot convention on 100 real Swiss-Prot entries, locally and through a fake REST API.

Expected values come from the flat file itself, read here without Biopython: entries split
at their ``//`` lines, accessions from the AC lines, declared length, weight and CRC64 from
the SQ line, and a CRC64 computed by this file's own bitwise implementation.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from osa_sdk.contract import BYTES_PER_MB, files_dir_for
from osa_sdk.runtime import run_ingest
from osa_sdk.types import HookRecord, IngesterRecord, IngestReport, RecordRef, Reject

from osa_dagster.conventions.http import UpstreamError
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.conventions.uniprot import CONVENTIONS, uniprot_convention
from osa_dagster.conventions.uniprot.hooks import extract_features, validate_sequence
from osa_dagster.conventions.uniprot.ingester import (
    DEFAULT_FLAT_FILE,
    UniProtEntryMetadata,
    UniProtFlatFileIngester,
)
from osa_dagster.conventions.uniprot.measure import measure
from osa_dagster.conventions.uniprot.rest import UniProtRestIngester
from osa_dagster.settings import Settings
from tests.conventions.fake_upstream import FakeUpstream, Reply

SEARCH = "/uniprotkb/search"


# --- the file, read without the code under test --------------------------------------------


def crc64_iso(sequence: str) -> str:
    """CRC-64-ISO as Swiss-Prot computes it (reflected, polynomial x^64+x^4+x^3+x+1)."""
    crc = 0
    for byte in sequence.encode():
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xD800000000000000 if crc & 1 else 0)
    return f"{crc:016X}"


@dataclass(frozen=True)
class Entry:
    text: str
    accessions: list[str]
    entry_name: str
    declared_length: int
    sq_length: int
    sq_weight: int
    sq_crc: str
    sequence: str
    modified: date
    keywords: list[str]

    @property
    def accession(self) -> str:
        return self.accessions[0]


def read_entries(text: str) -> list[Entry]:
    entries = []
    for chunk in re.findall(r"^ID   .*?^//\n", text, flags=re.M | re.S):
        lines = chunk.splitlines()
        id_line = re.match(r"ID   (\S+)\s+\w+;\s+(\d+) AA\.", lines[0])
        assert id_line, lines[0]
        accessions = [a for line in lines if line.startswith("AC   ") for a in line[5:].split(";")]
        sq = next(line for line in lines if line.startswith("SQ   "))
        sq_fields = re.match(r"SQ   SEQUENCE\s+(\d+) AA;\s+(\d+) MW;\s+([0-9A-F]{16}) CRC64;", sq)
        assert sq_fields, sq
        start = lines.index(sq) + 1
        sequence = "".join(line.replace(" ", "") for line in lines[start:-1])
        version = next(line for line in lines if "entry version" in line)
        keywords = " ".join(line[5:] for line in lines if line.startswith("KW   "))
        entries.append(
            Entry(
                text=chunk,
                accessions=[a.strip() for a in accessions if a.strip()],
                entry_name=id_line[1],
                declared_length=int(id_line[2]),
                sq_length=int(sq_fields[1]),
                sq_weight=int(sq_fields[2]),
                sq_crc=sq_fields[3],
                sequence=sequence,
                modified=datetime.strptime(version[5:16], "%d-%b-%Y").date(),
                keywords=[k.strip() for k in keywords.rstrip(".").split(";") if k.strip()],
            )
        )
    return entries


SAMPLE_TEXT = gzip.decompress(DEFAULT_FLAT_FILE.read_bytes()).decode("ascii")
ENTRIES = read_entries(SAMPLE_TEXT)
BY_ACCESSION = {e.accession: e for e in ENTRIES}


def write_flat_file(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def ingest(ingester, refs: list[RecordRef], out: Path) -> tuple[IngestReport, list[IngesterRecord]]:
    report = run_ingest(ingester, refs, out)
    lines = (out / "records.jsonl").read_text().splitlines()
    return report, [IngesterRecord.model_validate_json(line) for line in lines]


def hook_record(files_root: Path, accession: str, text: str, name: str | None = None) -> HookRecord:
    folder = files_root / files_dir_for(accession)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (name or f"{accession}.dat")).write_text(text)
    return HookRecord(id=accession, files_dir=files_dir_for(accession)).bind_files_root(files_root)


def with_sequence(entry: Entry, sequence: str, *, fix_crc: bool = False) -> str:
    """The entry's text with its sequence lines replaced (SQ line kept unless fix_crc)."""
    head, _, tail = entry.text.partition("\nSQ   ")
    sq_line = "SQ   " + tail.splitlines()[0]
    if fix_crc:
        sq_line = re.sub(r"[0-9A-F]{16} CRC64", f"{crc64_iso(sequence)} CRC64", sq_line)
    body = [
        "     " + " ".join(sequence[j : j + 10] for j in range(i, min(i + 60, len(sequence)), 10))
        for i in range(0, len(sequence), 60)
    ]
    return "\n".join([head, sq_line, *body, "//"]) + "\n"


# --- the bundled sample --------------------------------------------------------------------


def test_sample_is_100_real_entries_gzipped_below_a_megabyte() -> None:
    assert DEFAULT_FLAT_FILE.name == "SWISS100.dat.gz"
    assert DEFAULT_FLAT_FILE.stat().st_size < 1_000_000
    assert len(ENTRIES) == 100 == SAMPLE_TEXT.count("\n//\n")
    assert len({e.accession for e in ENTRIES}) == 100


def test_the_sample_declares_what_its_sequences_are() -> None:
    """The facts the hooks check hold on the real data, by this file's own reading."""
    for entry in ENTRIES:
        assert len(entry.sequence) == entry.declared_length == entry.sq_length, entry.accession
        assert crc64_iso(entry.sequence) == entry.sq_crc, entry.accession


# --- local mode: discover -------------------------------------------------------------------


def test_discover_streams_every_entry_in_file_order() -> None:
    refs = list(UniProtFlatFileIngester().discover(None, None))
    assert [r.source_id for r in refs] == [e.accession for e in ENTRIES]
    for ref, entry in zip(refs, ENTRIES, strict=True):
        assert ref.size_hint_mb == pytest.approx(len(entry.text) / BYTES_PER_MB)


def test_discover_reads_plain_and_gzipped_files_alike(tmp_path: Path) -> None:
    plain = write_flat_file(tmp_path / "sprot.dat", SAMPLE_TEXT)
    from_plain = list(UniProtFlatFileIngester(plain).discover(None, None))
    assert from_plain == list(UniProtFlatFileIngester().discover(None, None))


def test_discover_stops_at_the_limit() -> None:
    ingester = UniProtFlatFileIngester()
    assert [r.source_id for r in ingester.discover(None, 7)] == [e.accession for e in ENTRIES[:7]]
    assert list(ingester.discover(None, 0)) == []
    with pytest.raises(ValueError, match="limit"):
        list(ingester.discover(None, -1))


def test_discover_since_selects_entries_changed_on_or_after_that_day() -> None:
    days = sorted({e.modified for e in ENTRIES})
    assert len(days) >= 2  # the sample has entries changed on different days
    cut = days[len(days) // 2]
    expected = [e.accession for e in ENTRIES if e.modified >= cut]
    assert 0 < len(expected) < 100
    ingester = UniProtFlatFileIngester()
    naive = datetime.combine(cut, datetime.min.time()) + timedelta(hours=23)
    assert [r.source_id for r in ingester.discover(naive, None)] == expected
    # 01:00 on that day at UTC+2 is still the day before in UTC.
    aware = datetime.combine(cut, datetime.min.time(), tzinfo=timezone(timedelta(hours=2)))
    earlier = [e.accession for e in ENTRIES if e.modified >= cut - timedelta(days=1)]
    assert [r.source_id for r in ingester.discover(aware + timedelta(hours=1), None)] == earlier


def test_discover_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.dat"):
        list(UniProtFlatFileIngester(tmp_path / "nowhere.dat").discover(None, None))


# --- local mode: fetch ----------------------------------------------------------------------


def test_fetch_writes_each_entry_and_its_metadata(tmp_path: Path) -> None:
    ingester = UniProtFlatFileIngester(release="2014_07")
    refs = list(ingester.discover(None, None))
    report, records = ingest(ingester, refs, tmp_path / "out")
    assert report.records == 100 and not report.failed and not report.missing
    for record in records:
        entry = BY_ACCESSION[record.source_id]
        [file] = record.files
        assert file.name == f"{entry.accession}.dat"
        written = tmp_path / "out/files" / record.files_dir / file.path
        assert written.read_text() == entry.text
        metadata = UniProtEntryMetadata.model_validate(record.metadata)
        assert metadata.accession == entry.accession
        assert metadata.entry_name == entry.entry_name
        assert metadata.sequence_length == entry.declared_length
        assert metadata.modified == entry.modified
        assert metadata.reviewed is True
        assert metadata.organism == "Homo sapiens (Human)"
        assert metadata.taxonomy_id == 9606
        assert metadata.release == "2014_07"
        assert metadata.source == "flatfile:SWISS100.dat.gz"


@pytest.mark.parametrize("name", ["sprot.dat", "sprot.dat.gz"])
def test_fetch_a_batch_from_the_middle_of_the_file(tmp_path: Path, name: str) -> None:
    ingester = UniProtFlatFileIngester(write_flat_file(tmp_path / name, SAMPLE_TEXT))
    refs = list(ingester.discover(None, None))[40:50]
    report, records = ingest(ingester, list(reversed(refs)), tmp_path / "out")
    assert report.records == 10
    assert {r.source_id for r in records} == {r.source_id for r in refs}
    for record in records:
        written = tmp_path / "out/files" / record.files_dir / f"{record.source_id}.dat"
        assert written.read_text() == BY_ACCESSION[record.source_id].text


def test_fetch_fails_refs_whose_entry_moved_since_discover(tmp_path: Path) -> None:
    path = write_flat_file(tmp_path / "sprot.dat", SAMPLE_TEXT)
    ingester = UniProtFlatFileIngester(path)
    refs = list(ingester.discover(None, 3))
    # A new release with an entry more at the top: every planned offset now points elsewhere.
    write_flat_file(path, ENTRIES[5].text + SAMPLE_TEXT)
    report, records = ingest(ingester, refs, tmp_path / "out")
    assert records == []
    assert len(report.failed) == 3
    for failed in report.failed:
        assert f"entry {failed.source_id} is not where it was" in failed.error
        assert "the file changed since this batch was planned" in failed.error


def test_fetch_fails_a_ref_whose_place_holds_another_entry(tmp_path: Path) -> None:
    path = write_flat_file(tmp_path / "sprot.dat", SAMPLE_TEXT)
    ingester = UniProtFlatFileIngester(path)
    [ref] = list(ingester.discover(None, 1))
    # The same bytes at the same place, but another entry's accession.
    other = ENTRIES[0].text.replace(ENTRIES[0].accession, "Q00001", 1)
    write_flat_file(path, other + SAMPLE_TEXT[len(other) :])
    report, records = ingest(ingester, [ref], tmp_path / "out")
    assert records == []
    [failed] = report.failed
    assert f"entry Q00001 stands where {ENTRIES[0].accession} was" in failed.error


def test_fetch_fails_a_ref_that_discover_did_not_make(tmp_path: Path) -> None:
    report, _ = ingest(UniProtFlatFileIngester(), [RecordRef(source_id="P31946")], tmp_path / "out")
    [failed] = report.failed
    assert failed.source_id == "P31946" and "plan it with this ingester's discover" in failed.error


# --- local mode: damaged entries ------------------------------------------------------------


def damaged_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A gzipped flat file with a good entry, an entry with a broken ID line, a stray line,
    an entry whose sequence was altered after its CRC, and a last entry cut short."""
    good, broken_id, altered, cut = ENTRIES[0], ENTRIES[1], ENTRIES[2], ENTRIES[3]
    residues = list(altered.sequence)
    residues[9] = "W" if residues[9] != "W" else "A"
    text = (
        good.text
        + broken_id.text.replace(f"{broken_id.declared_length} AA.", "many AA.", 1)
        + "garbage between entries\n"
        + with_sequence(altered, "".join(residues))
        + cut.text[: len(cut.text) // 2]
    )
    path = write_flat_file(tmp_path / "damaged.dat.gz", text)
    return path, {"good": good.accession, "broken_id": broken_id.accession,
                  "altered": altered.accession, "cut": cut.accession}  # fmt: skip


def test_damaged_entries_are_skipped_only_when_they_cannot_be_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, ids = damaged_file(tmp_path)
    ingester = UniProtFlatFileIngester(path)
    with caplog.at_level(logging.WARNING):
        refs = list(ingester.discover(None, None))
    assert [r.source_id for r in refs] == [ids["good"], ids["altered"], ids["cut"]]
    broken_at = ENTRIES[0].text.count("\n") + 1
    [skipped] = ingester.skipped
    assert skipped.where == f"damaged.dat.gz line {broken_at}"
    assert skipped.reason.startswith("the entry's header cannot be read")
    log = caplog.text
    assert "skipping a line outside any entry" in log
    assert "the file ends inside an entry" in log


def test_a_folder_of_flat_files_is_read_in_name_order_skipping_repeats_and_damage(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "uniprot"
    folder.mkdir()
    first = "".join(e.text for e in ENTRIES[:60])
    second = "".join(e.text for e in ENTRIES[55:])  # repeats five entries of the first
    write_flat_file(folder / "a_sprot.dat.gz", first)
    write_flat_file(folder / "b_more.dat", second)
    (folder / "c_cut.dat.gz").write_bytes(gzip.compress(first.encode())[:200])
    (folder / "README").write_text("not a flat file")
    ingester = UniProtFlatFileIngester(folder)
    refs = list(ingester.discover(None, None))
    assert [r.source_id for r in refs] == [e.accession for e in ENTRIES]
    assert {r.extra["file"] for r in refs} == {"a_sprot.dat.gz", "b_more.dat"}
    skipped = {s.where: s.reason for s in ingester.skipped}
    repeats = {w: r for w, r in skipped.items() if w.startswith("b_more.dat")}
    line_of = {e.accession: first[: first.index(e.text)].count("\n") + 1 for e in ENTRIES[:60]}
    assert sorted(repeats.values()) == sorted(
        f"entry {e.accession} repeats a_sprot.dat.gz line {line_of[e.accession]}"
        for e in ENTRIES[55:60]
    )
    # What the cut file holds before its damage repeats the first file; then it is skipped.
    assert skipped["c_cut.dat.gz"].startswith("cannot be read past what was planned from it")

    report, records = ingest(ingester, refs, tmp_path / "out")
    assert report.records == 100 and not report.failed
    for record in records:
        text = (tmp_path / "out/files" / record.files_dir / f"{record.source_id}.dat").read_text()
        assert text == BY_ACCESSION[record.source_id].text


def test_damaged_entries_reach_the_hooks_and_are_rejected_with_reasons(tmp_path: Path) -> None:
    path, ids = damaged_file(tmp_path)
    ingester = UniProtFlatFileIngester(path)
    report, records = ingest(ingester, list(ingester.discover(None, None)), tmp_path / "out")
    assert report.records == 3
    by_id = {r.source_id: r for r in records}
    # The cut entry keeps what its header says; the hooks, which read all of it, reject it.
    cut = UniProtEntryMetadata.model_validate(by_id[ids["cut"]].metadata)
    assert cut.entry_name == ENTRIES[3].entry_name
    assert cut.organism == "Homo sapiens (Human)" and cut.taxonomy_id == 9606
    files_root = tmp_path / "out/files"
    outcomes = {}
    for record in records:
        hook_input = HookRecord.from_ingested(record).bind_files_root(files_root)
        try:
            validate_sequence(hook_input)
            outcomes[record.source_id] = "passed"
        except Reject as rejection:
            outcomes[record.source_id] = rejection.reason
    assert outcomes[ids["good"]] == "passed"
    assert "CRC64" in outcomes[ids["altered"]]
    assert "cannot be read as a UniProt flat-file entry" in outcomes[ids["cut"]]
    assert "Unexpected end" in outcomes[ids["cut"]]


# --- hooks on the real entries --------------------------------------------------------------


@pytest.fixture(scope="module")
def fetched_sample(tmp_path_factory: pytest.TempPathFactory) -> list[HookRecord]:
    out = tmp_path_factory.mktemp("uniprot") / "out"
    ingester = UniProtFlatFileIngester()
    _, records = ingest(ingester, list(ingester.discover(None, None)), out)
    return [HookRecord.from_ingested(r).bind_files_root(out / "files") for r in records]


def test_every_real_entry_passes_validation(fetched_sample: list[HookRecord]) -> None:
    assert len(fetched_sample) == 100
    for record in fetched_sample:
        assert validate_sequence(record) is None


def test_features_of_every_real_entry_agree_with_the_file(
    fetched_sample: list[HookRecord],
) -> None:
    for record in fetched_sample:
        entry = BY_ACCESSION[record.id]
        features = extract_features(record)
        assert features["entry_name"] == entry.entry_name
        assert features["sequence_length"] == entry.sq_length
        # The SQ line rounds to whole daltons, and UniProt's average residue masses differ
        # from Biopython's in the last digits: 3.9 Da off for the sample's largest, 293 kDa.
        off = abs(features["mass_da"] - entry.sq_weight)
        assert off <= 0.5 + 1.5e-5 * entry.sq_weight, (record.id, off)
        assert features["organism"] == "Homo sapiens (Human)"
        assert features["taxonomy_id"] == 9606
        assert features["keywords"] == entry.keywords
        assert features["reviewed"] is True
        assert features["lineage"][0] == "Eukaryota" and features["lineage"][-1] == "Homo"
        json.dumps(features)  # a feature row must be JSON


CORRUPTIONS = {
    "one residue changed": (lambda s: s[:20] + ("A" if s[20] != "A" else "G") + s[21:], "CRC64"),
    "a residue lost": (
        lambda s: s[:-1],
        "the sequence has {n} residues but the ID line declares {declared}",
    ),
    "a digit in the sequence": (
        lambda s: s[:4] + "1" + s[5:],
        "not amino-acid codes: '1' at 5",
    ),
    "lower case": (lambda s: s[:2] + s[2:5].lower() + s[5:], "not amino-acid codes:"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_sequence_is_rejected_with_a_readable_reason(
    tmp_path: Path, corruption: str
) -> None:
    entry = ENTRIES[0]
    change, reason = CORRUPTIONS[corruption]
    sequence = change(entry.sequence)
    record = hook_record(tmp_path, entry.accession, with_sequence(entry, sequence))
    expected = reason.format(n=len(sequence), declared=entry.declared_length)
    for hook in (validate_sequence, extract_features):
        with pytest.raises(Reject, match=re.escape(expected)):
            hook(record)


def test_an_sq_line_disagreeing_with_the_id_line_is_rejected(tmp_path: Path) -> None:
    entry = ENTRIES[0]
    text = entry.text.replace(f"SEQUENCE   {entry.sq_length} AA", "SEQUENCE   999 AA")
    with pytest.raises(Reject, match="SQ line declares 999"):
        validate_sequence(hook_record(tmp_path, entry.accession, text))


def test_ambiguous_residues_pass_without_a_mass(tmp_path: Path) -> None:
    entry = ENTRIES[0]
    sequence = entry.sequence[:10] + "X" + entry.sequence[11:]
    record = hook_record(tmp_path, entry.accession, with_sequence(entry, sequence, fix_crc=True))
    features = extract_features(record)
    assert features["mass_da"] is None and features["sequence_length"] == entry.sq_length


def test_an_entry_of_another_accession_is_rejected(tmp_path: Path) -> None:
    entry = ENTRIES[0]
    secondary = entry.accessions[1]
    with pytest.raises(Reject, match=f"{secondary} is now a secondary accession of entry"):
        validate_sequence(hook_record(tmp_path, secondary, entry.text))
    with pytest.raises(Reject, match=f"holds entry {entry.entry_name}"):
        validate_sequence(hook_record(tmp_path, ENTRIES[1].accession, entry.text))


def test_a_record_without_an_entry_file_is_rejected(tmp_path: Path) -> None:
    record = hook_record(tmp_path, "P31946", ENTRIES[0].text, name="P31946.txt")
    with pytest.raises(
        Reject, match=r"no UniProt flat-file entry \(\.dat\); its files: P31946\.txt"
    ):
        validate_sequence(record)


def test_something_else_than_an_entry_is_rejected(tmp_path: Path) -> None:
    record = hook_record(tmp_path, "P31946", "<html>Service unavailable</html>\n")
    with pytest.raises(Reject, match="cannot be read as a UniProt flat-file entry"):
        extract_features(record)


# --- the convention -------------------------------------------------------------------------


def test_the_convention_loads_by_module_name() -> None:
    conventions = load_conventions(Settings.from_env(), ["osa_dagster.conventions.uniprot"])
    uniprot = conventions["uniprot"]
    assert uniprot == CONVENTIONS[0]
    assert [h.name for h in uniprot.hooks] == ["validate_sequence", "extract_features"]
    assert isinstance(uniprot.make_ingester(), UniProtFlatFileIngester)
    rest = uniprot_convention(name="uniprot_rest", ingester=UniProtRestIngester, query="x")
    ingester = rest.make_ingester()
    assert isinstance(ingester, UniProtRestIngester) and ingester.query == "x"


@pytest.mark.slow
def test_both_hooks_peak_far_below_the_base_of_their_memory_ladder() -> None:
    for measured in measure(repeat=1):
        assert measured.records == measured.passed == 100
        base = CONVENTIONS[0].hook(measured.hook).memory.base_mb
        assert 10 < measured.peak_rss_mb < base / 2, measured
        if measured.cgroup_peak_mb is not None:
            assert measured.cgroup_peak_mb < base / 2, measured
        assert measured.records_per_s > 0


# --- REST mode ------------------------------------------------------------------------------


def rest_ingester(upstream: FakeUpstream, **config) -> UniProtRestIngester:
    return UniProtRestIngester(base_url=upstream.base_url, **config)


def search_page(accessions: list[str], *, next_cursor: str | None, release: str = "2014_07"):
    headers = {"X-UniProt-Release": release, "X-Total-Results": "100"}
    if next_cursor is not None:
        headers["Link"] = (
            f'</uniprotkb/search?query=reviewed%3Atrue&cursor={next_cursor}>; rel="next"'
        )
    hits = [
        {"entryType": "UniProtKB reviewed (Swiss-Prot)", "primaryAccession": a} for a in accessions
    ]
    return Reply.json({"results": hits}, headers=headers)


def paged_search(upstream: FakeUpstream, page_size: int) -> None:
    """The sample's accessions, page_size per page, chained by cursors."""
    accessions = [e.accession for e in ENTRIES]
    pages = [accessions[i : i + page_size] for i in range(0, len(accessions), page_size)]

    def answer(request) -> Reply:
        index = int(request.param("cursor") or 0)
        has_next = index + 1 < len(pages)
        return search_page(pages[index], next_cursor=str(index + 1) if has_next else None)

    upstream.route(SEARCH, answer)


def serve_entries(upstream: FakeUpstream, missing: frozenset[str] = frozenset()) -> None:
    def answer(request) -> Reply:
        name = request.path.rsplit("/", 1)[1]
        accession, _, extension = name.partition(".")
        entry = BY_ACCESSION.get(accession)
        if entry is None or accession in missing:
            return Reply.text("Error: not found", status=404)
        headers = {"X-UniProt-Release": "2014_08"}
        if extension == "fasta":
            return Reply.text(
                f">sp|{accession}|{entry.entry_name}\n{entry.sequence}\n", headers=headers
            )
        return Reply.text(entry.text, headers=headers, gzip=True)

    upstream.route("/uniprotkb/", answer, prefix=True)


def test_rest_discover_follows_the_next_links(fake_upstream: FakeUpstream) -> None:
    paged_search(fake_upstream, page_size=30)
    refs = list(rest_ingester(fake_upstream).discover(None, None))
    assert [r.source_id for r in refs] == [e.accession for e in ENTRIES]
    assert {r.extra["release"] for r in refs} == {"2014_07"}
    requests = fake_upstream.requests(SEARCH)
    assert [r.param("cursor") for r in requests] == [None, "1", "2", "3"]
    first = requests[0]
    assert first.param("query") == "reviewed:true"
    assert first.param("size") == "500" and first.param("format") == "json"


def test_rest_discover_stops_at_the_limit_without_asking_for_more(
    fake_upstream: FakeUpstream,
) -> None:
    paged_search(fake_upstream, page_size=30)
    refs = list(rest_ingester(fake_upstream).discover(None, 45))
    assert [r.source_id for r in refs] == [e.accession for e in ENTRIES[:45]]
    requests = fake_upstream.requests(SEARCH)
    assert len(requests) == 2 and requests[0].param("size") == "45"


def test_rest_discover_since_adds_a_modification_date_clause(fake_upstream: FakeUpstream) -> None:
    fake_upstream.route(SEARCH, search_page(["P31946"], next_cursor=None))
    since = datetime(2014, 7, 1, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    list(rest_ingester(fake_upstream, query="organism_id:9606").discover(since, None))
    [request] = fake_upstream.requests(SEARCH)
    assert request.param("query") == "(organism_id:9606) AND (date_modified:[2014-07-02 TO *])"


def test_rest_discover_waits_out_a_429(fake_upstream: FakeUpstream) -> None:
    fake_upstream.route(
        SEARCH,
        [
            Reply.text("Too many requests", status=429, headers={"Retry-After": "1"}),
            search_page(["P31946", "P62258"], next_cursor=None),
        ],
    )
    refs = list(rest_ingester(fake_upstream).discover(None, None))
    assert [r.source_id for r in refs] == ["P31946", "P62258"]
    first, second = fake_upstream.requests(SEARCH)
    assert second.at - first.at >= 0.9


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (Reply.text("<html>maintenance</html>", headers={"Content-Type": "text/html"}), "not JSON"),
        (Reply.json({"entries": []}), "not a UniProtKB search page"),
        (Reply.json({"results": [{"accession": "P31946"}]}), "primaryAccession"),
    ],
)
def test_a_malformed_search_answer_fails_discover_naming_the_url(
    fake_upstream: FakeUpstream, reply: Reply, problem: str
) -> None:
    fake_upstream.route(SEARCH, reply)
    with pytest.raises(UpstreamError, match=problem) as raised:
        list(rest_ingester(fake_upstream).discover(None, None))
    assert str(raised.value).startswith(fake_upstream.url(SEARCH))


def test_a_release_change_while_paging_fails_discover(fake_upstream: FakeUpstream) -> None:
    fake_upstream.route(
        SEARCH,
        lambda request: (
            search_page(["P31946"], next_cursor="1")
            if request.param("cursor") is None
            else search_page(["P62258"], next_cursor=None, release="2014_08")
        ),
    )
    with pytest.raises(UpstreamError, match="release changed from 2014_07 to 2014_08"):
        list(rest_ingester(fake_upstream).discover(None, None))


def test_rest_fetch_writes_the_flat_file_entries(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    serve_entries(fake_upstream)
    refs = [RecordRef(source_id=e.accession, extra={"release": "2014_07"}) for e in ENTRIES[:5]]
    report, records = ingest(rest_ingester(fake_upstream, with_fasta=True), refs, tmp_path / "out")
    assert report.records == 5
    for record in records:
        entry = BY_ACCESSION[record.source_id]
        folder = tmp_path / "out/files" / record.files_dir
        assert (folder / f"{entry.accession}.dat").read_text() == entry.text
        assert (folder / f"{entry.accession}.fasta").read_text().endswith(entry.sequence + "\n")
        metadata = UniProtEntryMetadata.model_validate(record.metadata)
        # The release of the answer itself, not the one discover saw.
        assert metadata.release == "2014_08"
        assert metadata.source == fake_upstream.url(f"/uniprotkb/{entry.accession}.txt")
        hook_input = HookRecord.from_ingested(record).bind_files_root(tmp_path / "out/files")
        assert extract_features(hook_input)["sequence_length"] == entry.sq_length


def test_rest_fetch_makes_a_404_errored_and_goes_on(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    gone = ENTRIES[1].accession
    serve_entries(fake_upstream, missing=frozenset({gone}))
    refs = [RecordRef(source_id=e.accession) for e in ENTRIES[:3]]
    report, records = ingest(rest_ingester(fake_upstream), refs, tmp_path / "out")
    assert [r.source_id for r in records] == [ENTRIES[0].accession, ENTRIES[2].accession]
    [failed] = report.failed
    assert failed.source_id == gone
    assert fake_upstream.url(f"/uniprotkb/{gone}.txt") in failed.error and "404" in failed.error


def test_rest_fetch_retries_a_truncated_body(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    entry = ENTRIES[0]
    fake_upstream.route(
        f"/uniprotkb/{entry.accession}.txt",
        [Reply.text(entry.text, truncate_at=100), Reply.text(entry.text)],
    )
    report, records = ingest(
        rest_ingester(fake_upstream), [RecordRef(source_id=entry.accession)], tmp_path / "out"
    )
    assert report.records == 1
    assert (
        tmp_path / "out/files" / records[0].files_dir / f"{entry.accession}.dat"
    ).read_text() == entry.text
    assert len(fake_upstream.requests(f"/uniprotkb/{entry.accession}.txt")) == 2


def test_rest_fetch_fails_whole_when_the_service_stays_down(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route(
        "/uniprotkb/", Reply.text("down", status=503, headers={"Retry-After": "0"}), prefix=True
    )
    with pytest.raises(UpstreamError, match=r"P31946\.txt: HTTP 503.*gave up after 2 attempts"):
        ingest(
            rest_ingester(fake_upstream, max_attempts=2),
            [RecordRef(source_id="P31946")],
            tmp_path / "out",
        )


def test_rest_fetch_makes_a_non_entry_answer_errored(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.route("/uniprotkb/", Reply.text("<html>hello</html>"), prefix=True)
    report, records = ingest(
        rest_ingester(fake_upstream), [RecordRef(source_id="P31946")], tmp_path / "out"
    )
    assert records == []
    [failed] = report.failed
    assert "the answer is not a UniProt flat-file entry" in failed.error
    assert failed.error.startswith(fake_upstream.url("/uniprotkb/P31946.txt"))


def test_rest_page_size_is_bounded() -> None:
    with pytest.raises(ValueError, match="page_size must be between 1 and 500"):
        UniProtRestIngester(page_size=501)
