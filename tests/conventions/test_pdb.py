"""The pdb convention on the bundled mirror of real entries.

Expected values are computed independently of the code under test: file listings with
pathlib, header values and atom tables with gemmi's CIF reader (not gemmi.Structure, not
our streaming header reader), contacts with a plain double loop over the atom table.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import gemmi
import pytest
from osa_sdk.contract import BYTES_PER_MB, files_dir_for
from osa_sdk.runtime import run_ingest
from osa_sdk.types import HookRecord, IngesterRecord, RecordRef, Reject

from osa_dagster.conventions.pdb import CONVENTIONS
from osa_dagster.conventions.pdb.hooks import extract_features, validate_structure
from osa_dagster.conventions.pdb.ingester import (
    DEFAULT_MIRROR,
    PdbEntryMetadata,
    PdbMirrorIngester,
)
from osa_dagster.conventions.pdb.measure_memory import run_once
from osa_dagster.engine.cgroup import usable_parent

MIRROR_FILES = sorted(DEFAULT_MIRROR.glob("mmCIF/*/*.cif.gz"))
ALL_IDS = sorted(p.name.removesuffix(".cif.gz").upper() for p in MIRROR_FILES)
EXPECTED_REJECTIONS = {"1OSM": "cannot be read as mmCIF", "5MOO": "no atomic model"}


def mirror_file(pdb_id: str) -> Path:
    return next(p for p in MIRROR_FILES if p.name == f"{pdb_id.lower()}.cif.gz")


def hook_record(tmp_path: Path, pdb_id: str, *files: Path) -> HookRecord:
    """A record of `pdb_id` whose folder holds copies of `files` (default: its mirror file)."""
    folder = tmp_path / "files" / files_dir_for(pdb_id)
    folder.mkdir(parents=True)
    for file in files or (mirror_file(pdb_id),):
        shutil.copy(file, folder / file.name)
    record = HookRecord(id=pdb_id, files_dir=files_dir_for(pdb_id))
    return record.bind_files_root(tmp_path / "files")


def cif_block(path: Path) -> gemmi.cif.Block:
    return gemmi.cif.read(str(path)).sole_block()


def cif_values(block: gemmi.cif.Block, tag: str) -> list[str]:
    return [gemmi.cif.as_string(v) for v in block.find_values(tag) if not gemmi.cif.is_null(v)]


# --- the mirror ---------------------------------------------------------------------------


def test_mirror_is_real_sized_and_in_the_divided_layout() -> None:
    assert 30 <= len(MIRROR_FILES) <= 60
    for path in MIRROR_FILES:
        pdb_id = path.name.removesuffix(".cif.gz")
        assert len(pdb_id) == 4 and path.parent.name == pdb_id[1:3]
    readable = [p for p in MIRROR_FILES if p.name != "1osm.cif.gz"]
    sizes = [len(gzip.decompress(p.read_bytes())) / BYTES_PER_MB for p in readable]
    assert sum(size > 1 for size in sizes) >= 3
    assert sum(size < 0.05 for size in sizes) >= 3
    assert sum(p.stat().st_size for p in MIRROR_FILES) < 15e6
    # Every entry's own header names it.
    for path in readable:
        assert cif_block(path).find_value("_entry.id") == path.name[:4].upper()


# --- discover -----------------------------------------------------------------------------


def test_discover_lists_every_entry_in_id_order_with_its_size() -> None:
    refs = list(PdbMirrorIngester().discover(since=None, limit=None))
    assert [r.source_id for r in refs] == ALL_IDS
    sizes = {p.name[:4].upper(): p.stat().st_size / BYTES_PER_MB for p in MIRROR_FILES}
    assert all(r.size_hint_mb == pytest.approx(sizes[r.source_id]) for r in refs)


@pytest.mark.parametrize("limit", [0, 1, 7, len(ALL_IDS), len(ALL_IDS) + 5])
def test_discover_honours_limit_exactly(limit: int) -> None:
    refs = list(PdbMirrorIngester().discover(since=None, limit=limit))
    assert [r.source_id for r in refs] == ALL_IDS[:limit]


def test_discover_refuses_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        list(PdbMirrorIngester().discover(since=None, limit=-1))


@pytest.fixture
def dated_mirror(tmp_path: Path) -> tuple[Path, dict[str, datetime]]:
    """Six entries whose files were modified a day apart, in an order unlike id order."""
    mirror = tmp_path / "mirror"
    start = datetime(2024, 1, 1, tzinfo=UTC)
    modified = {}
    for days, pdb_id in enumerate(["6WG6", "1UBI", "5PTI", "1A28", "3KPR", "2JUY"]):
        source = mirror_file(pdb_id)
        target = mirror / "mmCIF" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        modified[pdb_id] = start + timedelta(days=days)
        stamp = modified[pdb_id].timestamp()
        os.utime(target, (stamp, stamp))
    return mirror, modified


def test_discover_since_selects_files_modified_after_it(
    dated_mirror: tuple[Path, dict[str, datetime]],
) -> None:
    mirror, modified = dated_mirror
    ingester = PdbMirrorIngester(mirror=mirror)
    since = modified["5PTI"]  # strictly after: 5PTI itself is not new
    expected = sorted(i for i, when in modified.items() if when > since)
    assert [r.source_id for r in ingester.discover(since=since, limit=None)] == expected
    # A naive datetime is read as UTC.
    naive = since.replace(tzinfo=None)
    assert [r.source_id for r in ingester.discover(since=naive, limit=None)] == expected
    # The limit counts selected entries only.
    assert [r.source_id for r in ingester.discover(since=since, limit=2)] == expected[:2]
    future = max(modified.values()) + timedelta(seconds=1)
    assert list(ingester.discover(since=future, limit=None)) == []


def test_discover_skips_files_that_are_not_entries(
    dated_mirror: tuple[Path, dict[str, datetime]],
) -> None:
    mirror, modified = dated_mirror
    ub = mirror / "mmCIF" / "ub"
    shutil.copy(ub / "1ubi.cif.gz", ub / ".1ubi.cif.gz.Ab12Cd")  # rsync's temporary file
    shutil.copy(ub / "1ubi.cif.gz", ub / "9xyz.cif.gz")  # in the wrong folder
    (ub / "README").write_text("not an entry")
    refs = PdbMirrorIngester(mirror=mirror).discover(since=None, limit=None)
    assert [r.source_id for r in refs] == sorted(modified)


def test_a_mirror_that_is_not_a_folder_is_refused_naming_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere is not a folder.*divided layout.*flat folder"):
        PdbMirrorIngester(mirror=tmp_path / "nowhere")


def flat_folder(tmp_path: Path) -> Path:
    """Real entries under names that are not their ids, one decompressed; a second copy of
    an entry; a damaged gzip; a CIF file of something that is not a PDB entry."""
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(mirror_file("1UBI"), folder / "ubiquitin.cif.gz")
    shutil.copy(mirror_file("5PTI"), folder / "z-copy-of-bpti.cif.gz")
    (folder / "bpti.cif").write_bytes(gzip.decompress(mirror_file("5PTI").read_bytes()))
    (folder / "broken.cif.gz").write_bytes(mirror_file("1A28").read_bytes()[:20])
    (folder / "ligand.cif").write_text("data_ATP\n_chem_comp.id ATP\n")
    (folder / "notes.txt").write_text("not a structure")
    return folder


def test_a_flat_folder_names_entries_by_their_data_lines_and_skips_with_reasons(
    tmp_path: Path,
) -> None:
    folder = flat_folder(tmp_path)
    ingester = PdbMirrorIngester(mirror=folder)
    refs = list(ingester.discover(since=None, limit=None))
    assert [(r.source_id, r.extra["path"]) for r in refs] == [
        ("5PTI", "bpti.cif"),
        ("1UBI", "ubiquitin.cif.gz"),
    ]
    skipped = {s.where: s.reason for s in ingester.skipped}
    assert set(skipped) == {"broken.cif.gz", "ligand.cif", "z-copy-of-bpti.cif.gz"}
    assert skipped["broken.cif.gz"].startswith("cannot be read as mmCIF")
    assert skipped["ligand.cif"] == "its data_ line names 'ATP', which is not a PDB id"
    assert skipped["z-copy-of-bpti.cif.gz"] == "entry 5PTI repeats bpti.cif, kept instead"

    out = tmp_path / "raw"
    report = run_ingest(PdbMirrorIngester(mirror=folder), refs, out)
    assert report.records == 2 and not report.failed and not report.missing
    records = [IngesterRecord.model_validate_json(line) for line in (out / "records.jsonl").open()]
    by_id = {r.source_id: r for r in records}
    assert [f.name for f in by_id["5PTI"].files] == ["bpti.cif"]
    metadata = PdbEntryMetadata.model_validate(by_id["5PTI"].metadata)
    expected = cif_block(mirror_file("5PTI"))
    assert metadata.title == cif_values(expected, "_struct.title")[0]
    assert metadata.source_path == "bpti.cif"
    # The hooks read a plain .cif as they read a gzipped one.
    validate_structure(HookRecord.from_ingested(by_id["5PTI"]).bind_files_root(out / "files"))


# --- fetch --------------------------------------------------------------------------------


def fetch(tmp_path: Path, ids: list[str]) -> tuple[dict[str, IngesterRecord], Path]:
    out = tmp_path / "raw"
    report = run_ingest(PdbMirrorIngester(), [RecordRef(source_id=i) for i in ids], out)
    assert report.missing == []
    lines = (out / "records.jsonl").read_text().splitlines()
    records = [IngesterRecord.model_validate_json(line) for line in lines]
    return {r.source_id: r for r in records}, out / "files"


# Native mmCIF (X-ray, EM, a joint X-ray/neutron entry) and converted from the PDB format.
FETCHED = ["1UBI", "3KPR", "5PTI", "6ZU5", "7DDO"]


def test_fetch_copies_each_entry_and_records_its_header(tmp_path: Path) -> None:
    records, files_root = fetch(tmp_path, FETCHED)
    assert sorted(records) == FETCHED
    for pdb_id, record in records.items():
        source = mirror_file(pdb_id)
        (file_ref,) = record.files
        copy = files_root / record.files_dir / file_ref.path
        assert copy.read_bytes() == source.read_bytes()
        assert file_ref.size_mb == pytest.approx(source.stat().st_size / BYTES_PER_MB)

        metadata = PdbEntryMetadata.model_validate(record.metadata)
        assert CONVENTIONS[0].record_schema is PdbEntryMetadata
        block = cif_block(source)
        assert metadata.pdb_id == pdb_id
        assert metadata.title == cif_values(block, "_struct.title")[0]
        assert metadata.methods == cif_values(block, "_exptl.method")
        revisions = cif_values(block, "_pdbx_audit_revision_history.revision_date") or (
            cif_values(block, "_database_PDB_rev.date")
        )
        assert metadata.revision_date == max(date.fromisoformat(d) for d in revisions)
        deposited = cif_values(block, "_pdbx_database_status.recvd_initial_deposition_date")
        assert metadata.deposition_date == date.fromisoformat(deposited[0])
        assert metadata.source_path == source.relative_to(DEFAULT_MIRROR).as_posix()
        assert metadata.source_modified_at.timestamp() == pytest.approx(source.stat().st_mtime)


def test_fetch_reports_refs_it_cannot_fetch(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    refs = [RecordRef(source_id=i) for i in ["1UBI", "9ZZZ", "not-an-id"]]
    report = run_ingest(PdbMirrorIngester(), refs, out)
    assert report.records == 1
    failed = {f.source_id: f.error for f in report.failed}
    assert sorted(failed) == ["9ZZZ", "not-an-id"]
    assert "not in the mirror" in failed["9ZZZ"]
    assert "not a PDB id" in failed["not-an-id"]
    assert sorted(p.name for p in (out / "files").iterdir()) == ["1UBI"]


def test_fetch_keeps_a_damaged_entry_for_the_validator_to_reject(tmp_path: Path) -> None:
    records, _ = fetch(tmp_path, ["1OSM"])
    metadata = PdbEntryMetadata.model_validate(records["1OSM"].metadata)
    # The header precedes the point where the gzip stream was cut; the revision history,
    # after the coordinates, is lost with the second half.
    assert metadata.title is not None and "OSMOPORIN" in metadata.title
    assert metadata.revision_date is None


# --- validate_structure -------------------------------------------------------------------


@pytest.mark.parametrize("pdb_id", [i for i in ALL_IDS if i not in EXPECTED_REJECTIONS])
def test_validate_passes_real_entries(tmp_path: Path, pdb_id: str) -> None:
    assert validate_structure(hook_record(tmp_path, pdb_id)) is None


@pytest.mark.parametrize("pdb_id", sorted(EXPECTED_REJECTIONS))
def test_validate_rejects_the_odd_entries_of_the_mirror(tmp_path: Path, pdb_id: str) -> None:
    with pytest.raises(Reject, match=EXPECTED_REJECTIONS[pdb_id]):
        validate_structure(hook_record(tmp_path, pdb_id))


def truncated_in_a_row(pdb_id: str) -> str:
    """The entry's text cut in the middle of an _atom_site row, like a broken download."""
    text = gzip.decompress(mirror_file(pdb_id).read_bytes()).decode()
    rows = [i for i, line in enumerate(text.splitlines(keepends=True)) if line.startswith("ATOM")]
    lines = text.splitlines(keepends=True)
    middle = rows[len(rows) // 2]
    return "".join(lines[:middle]) + lines[middle][:30]


@pytest.mark.parametrize("suffix", [".cif", ".cif.gz"])
def test_validate_rejects_a_truncated_file(tmp_path: Path, suffix: str) -> None:
    broken = tmp_path / f"1ubi{suffix}"
    data = truncated_in_a_row("1UBI").encode()
    broken.write_bytes(gzip.compress(data) if suffix == ".cif.gz" else data)
    record = hook_record(tmp_path / "batch", "1UBI", broken)
    with pytest.raises(Reject) as rejected:
        validate_structure(record)
    assert rejected.value.reason.startswith(f"1ubi{suffix} cannot be read as mmCIF")


def test_validate_rejects_a_structure_without_polymer(tmp_path: Path) -> None:
    # 1UBI with only its water molecules: a model with atoms, but nothing to call a chain.
    structure = gemmi.read_structure(str(mirror_file("1UBI")))
    for chain in structure[0]:
        for index in reversed(range(len(chain))):
            if not chain[index].is_water():
                del chain[index]
    structure.setup_entities()
    waters = tmp_path / "1ubi.cif"
    structure.make_mmcif_document().write_file(str(waters))
    with pytest.raises(Reject, match="no polymer"):
        validate_structure(hook_record(tmp_path / "batch", "1UBI", waters))


def test_validate_rejects_a_record_without_mmcif(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("no structure here")
    with pytest.raises(Reject, match=r"no mmCIF file .* notes\.txt"):
        validate_structure(hook_record(tmp_path / "batch", "1UBI", other))


# --- extract_features ---------------------------------------------------------------------

ATOM_COLUMNS = [
    "label_atom_id",
    "label_entity_id",
    "label_seq_id",
    "auth_asym_id",
    "auth_seq_id",
    "pdbx_PDB_ins_code",
    "label_comp_id",
    "Cartn_x",
    "Cartn_y",
    "Cartn_z",
    "pdbx_PDB_model_num",
]


def expected_features(path: Path) -> dict[str, object]:
    """The features of an entry computed from its CIF tables alone."""
    block = cif_block(path)
    table = block.find("_atom_site.", ATOM_COLUMNS)
    rows = [[gemmi.cif.as_string(row[i]) for i in range(len(ATOM_COLUMNS))] for row in table]
    first_model = rows[0][-1]
    model = [r for r in rows if r[-1] == first_model]
    polymer_entities = set(cif_values(block, "_entity_poly.entity_id"))
    polymer = [r for r in model if r[1] in polymer_entities]

    # One representative atom per residue: its first CA, else its first C4', in file order.
    firsts: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for r in polymer:
        if r[0] in ("CA", "C4'"):
            firsts.setdefault(((r[3], r[4], r[5], r[6]), r[0]), r)
    residues = dict.fromkeys(residue for residue, _ in firsts)
    atoms = [firsts.get((res, "CA")) or firsts[(res, "C4'")] for res in residues]
    contacts = interchain = long_range = 0
    for i, a in enumerate(atoms):
        for b in atoms[i + 1 :]:
            distance = math.dist([float(v) for v in a[7:10]], [float(v) for v in b[7:10]])
            if distance < 8.0:
                contacts += 1
                if a[3] != b[3]:
                    interchain += 1
                elif abs(int(a[2]) - int(b[2])) >= 24:
                    long_range += 1

    resolution = cif_values(block, "_refine.ls_d_res_high") or cif_values(
        block, "_em_3d_reconstruction.resolution"
    )
    crystal = "X-RAY DIFFRACTION" in cif_values(block, "_exptl.method")
    cell_tags = ["length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"]
    return {
        "methods": set(cif_values(block, "_exptl.method")),
        "resolution_a": float(resolution[0]) if resolution else None,
        "models": len({r[-1] for r in rows}),
        "polymer_chains": len({r[3] for r in polymer}),
        "polymer_residues": len({(r[3], r[4], r[5], r[6]) for r in polymer}),
        "atoms": len(model),
        "polymer_types": sorted(set(cif_values(block, "_entity_poly.type"))),
        "spacegroup": cif_values(block, "_symmetry.space_group_name_H-M")[0] if crystal else None,
        "cell": [float(block.find_value(f"_cell.{t}")) for t in cell_tags] if crystal else None,
        "contact_residues": len(atoms),
        "contacts_8a": contacts,
        "interchain_contacts_8a": interchain,
        "long_range_contacts_8a": long_range,
    }


@pytest.mark.parametrize(
    "pdb_id",
    [
        "1UBI",  # X-ray, converted from the PDB format
        "4OZ7",  # two chains
        "5PTI",  # joint X-ray and neutron diffraction
        "1LCD",  # NMR, 3 models, protein and DNA
        "3HSY",  # X-ray dimer, 730 residues
        "6MSM",  # cryo-EM, converted
    ],
)
def test_extract_features_match_an_independent_computation(tmp_path: Path, pdb_id: str) -> None:
    features = extract_features(hook_record(tmp_path, pdb_id))
    expected = expected_features(mirror_file(pdb_id))
    assert set(features.pop("method").split("; ")) == expected.pop("methods")
    resolution = expected.pop("resolution_a")
    assert features.pop("resolution_a") == (pytest.approx(resolution) if resolution else None)
    cell = expected.pop("cell")
    assert features.pop("cell") == (pytest.approx(cell) if cell else None)
    assert features == expected


def test_extract_features_reject_what_validation_rejects(tmp_path: Path) -> None:
    with pytest.raises(Reject, match="no atomic model"):
        extract_features(hook_record(tmp_path, "5MOO"))


@pytest.mark.slow
@pytest.mark.skipif(usable_parent() is None, reason="needs a cgroup v1 memory controller")
def test_only_the_ribosome_needs_more_than_the_base_memory_and_double_suffices() -> None:
    """The premise of the demo: at 192 MB the kernel kills extract_features on 6ZU5 only."""
    base = CONVENTIONS[0].hook("extract_features").memory.base_mb
    for pdb_id, limit, killed in [
        ("6WG6", base, False),  # the largest entry after 6ZU5
        ("6ZU5", base, True),
        ("6ZU5", 2 * base, False),
    ]:
        _, outcome, group = run_once(mirror_file(pdb_id), pdb_id, "extract_features", limit)
        assert group is not None
        try:
            assert (group.oom_kills() > 0) is killed, (pdb_id, limit)
            assert outcome == ("none" if killed else "passed")
        finally:
            group.remove()


# wwPDB's obsolete.dat as published: a title, then one OBSLTE line per obsolete entry.
OBSOLETE_DAT = """\
 LIST OF OBSOLETE COORDINATE ENTRIES AND SUCCESSORS
OBSLTE    31-JUL-94 116L     216L
OBSLTE    02-JAN-24 1UBI     9UBI 9UBJ
OBSLTE    03-JAN-24 1A28
"""


def test_discover_lists_the_obsolete_entries_of_obsolete_dat_with_their_successors(
    dated_mirror: tuple[Path, dict[str, datetime]],
) -> None:
    mirror, modified = dated_mirror
    (mirror / "obsolete.dat").write_text(OBSOLETE_DAT)
    refs = list(PdbMirrorIngester(mirror=mirror).discover(since=None, limit=None))
    live = [r.source_id for r in refs if r.obsolete is None]
    # An entry both in the mirror and in the list is what the list says: obsolete.
    assert live == sorted(set(modified) - {"1UBI", "1A28"})
    obsolete = {r.source_id: r.obsolete.superseded_by for r in refs if r.obsolete}
    assert obsolete == {"116L": ("216L",), "1A28": (), "1UBI": ("9UBI", "9UBJ")}
    # A watch sees the entries declared obsolete since the day it last looked.
    since = datetime(2024, 1, 3, 12, tzinfo=UTC)
    watched = PdbMirrorIngester(mirror=mirror).discover(since=since, limit=None)
    assert [r.source_id for r in watched if r.obsolete] == ["1A28"]


def test_an_obsolete_dat_line_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "mmCIF").mkdir(parents=True)
    (mirror / "obsolete.dat").write_text(OBSOLETE_DAT + "OBSLTE    31-FOO-94 1ABC\n")
    with pytest.raises(ValueError, match=r"obsolete\.dat, line 5: not an OBSLTE record"):
        list(PdbMirrorIngester(mirror=mirror).discover(since=None, limit=None))
