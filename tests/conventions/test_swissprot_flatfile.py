"""The Swiss-Prot-sized flat file of the scale benchmark (tests/fixtures/swissprot_flatfile.py)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from osa_sdk.runtime import run_ingest
from osa_sdk.types import HookRecord, IngesterRecord

from osa_dagster.conventions.uniprot.hooks import extract_features, validate_sequence
from osa_dagster.conventions.uniprot.ingester import DEFAULT_FLAT_FILE, UniProtFlatFileIngester
from tests.fixtures.swissprot_flatfile import ACCESSION_PATTERN, accession, write_flat_file

# Two and a half rounds of the 100 bundled entries: every entry is copied, some twice.
COUNT = 250


def bundled_accessions() -> set[str]:
    text = gzip.decompress(DEFAULT_FLAT_FILE.read_bytes()).decode("ascii")
    return {a for line in re.findall(r"^AC   (.*)$", text, re.M) for a in re.findall(r"\w+", line)}


def test_the_same_count_gives_the_same_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.dat", tmp_path / "b.dat"
    assert write_flat_file(first, COUNT) == write_flat_file(second, COUNT)
    assert first.read_bytes() == second.read_bytes()
    # A shorter file is the start of a longer one: the tenth-size run reads the same entries.
    shorter = tmp_path / "c.dat"
    write_flat_file(shorter, COUNT // 2)
    assert first.read_bytes().startswith(shorter.read_bytes())


def test_accessions_are_unique_well_formed_and_fresh() -> None:
    generated = [accession(n) for n in range(200_000)]
    assert len(set(generated)) == len(generated)
    assert all(re.fullmatch(ACCESSION_PATTERN, a) for a in generated)
    assert not set(generated) & bundled_accessions()


def test_every_entry_is_ingested_and_passes_both_hooks(tmp_path: Path) -> None:
    path = tmp_path / "sprot.dat"
    write_flat_file(path, COUNT)
    ingester = UniProtFlatFileIngester(path)
    refs = list(ingester.discover(None, None))
    assert [r.source_id for r in refs] == [accession(n) for n in range(COUNT)]
    assert not ingester.skipped

    out = tmp_path / "out"
    report = run_ingest(ingester, refs, out)
    assert report.records == COUNT and not report.failed and not report.missing
    lines = (out / "records.jsonl").read_text().splitlines()
    for line in lines:
        ingested = IngesterRecord.model_validate_json(line)
        assert ingested.metadata["accession"] == ingested.source_id
        assert ingested.metadata["entry_name"] == f"{ingested.source_id}_HUMAN"
        record = HookRecord.from_ingested(ingested).bind_files_root(out / "files")
        validate_sequence(record)
        assert extract_features(record)["entry_name"] == f"{ingested.source_id}_HUMAN"
