"""Hooks of the uniprot convention, with Biopython: validate_sequence and extract_features.

Both read the record's ``<accession>.dat`` (one UniProtKB flat-file entry, as either
ingester writes it) with Biopython's Swiss-Prot parser and reject it for the same reasons,
so a record that one of them cannot use is rejected with one message, whichever runs first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from Bio import SwissProt
from Bio.Data.IUPACData import extended_protein_letters, protein_weights
from Bio.SeqUtils import molecular_weight
from Bio.SeqUtils.CheckSum import crc64
from osa_sdk.authoring import hook
from osa_sdk.types import HookRecord, Reject

from osa_dagster.conventions.uniprot.ingester import (
    ENTRY_FILE_SUFFIX,
    EntryParseError,
    organism_name,
    parse_entry,
    taxonomy_id,
)

SEQUENCE_ALPHABET = frozenset(extended_protein_letters)
"""The 20 amino acids, selenocysteine (U), pyrrolysine (O) and the ambiguity codes B, Z, J, X."""

# Letters with a known average mass: the 20 amino acids, U and O. The ambiguity codes
# have none, so the mass of a sequence with one of them is unknown.
_WEIGHED_LETTERS = frozenset(protein_weights)

_SHOWN_PROBLEMS = 5


def entry_file(record: HookRecord) -> Path:
    """The record's one flat-file entry (``.dat``)."""
    found = [p for p in record.files() if p.name.endswith(ENTRY_FILE_SUFFIX)]
    if not found:
        names = ", ".join(p.name for p in record.files()) or "none"
        raise Reject(f"the record has no UniProt flat-file entry (.dat); its files: {names}")
    if len(found) > 1:
        raise Reject(
            "the record has several flat-file entries, so it is unclear which one it is: "
            + ", ".join(p.name for p in found)
        )
    return found[0]


def read_entry(path: Path) -> SwissProt.Record:
    """The entry parsed by Biopython, or a rejection saying why it cannot be."""
    try:
        return parse_entry(path.read_bytes())
    except EntryParseError as error:
        raise Reject(
            f"{path.name} cannot be read as a UniProt flat-file entry, it is damaged, "
            f"truncated or not in that format: {error}"
        ) from None


def _positions(sequence: str, letters: set[str]) -> str:
    found = [
        f"{letter!r} at {i}" for i, letter in enumerate(sequence, start=1) if letter in letters
    ]
    more = f" and {len(found) - _SHOWN_PROBLEMS} more" if len(found) > _SHOWN_PROBLEMS else ""
    return ", ".join(found[:_SHOWN_PROBLEMS]) + more


def check_identity(record: HookRecord, entry: SwissProt.Record, name: str) -> None:
    """The entry is the record's: its primary accession is the record's id."""
    if entry.accessions and entry.accessions[0] == record.id:
        return
    if record.id in entry.accessions:
        raise Reject(
            f"{record.id} is now a secondary accession of entry {entry.accessions[0]} "
            f"({entry.entry_name}): the entries were merged upstream"
        )
    raise Reject(
        f"{name} holds entry {entry.entry_name} (accessions "
        f"{', '.join(entry.accessions) or 'none'}), not {record.id}"
    )


def check_sequence(entry: SwissProt.Record) -> None:
    """The sequence uses amino-acid codes and agrees with the length and CRC64 declared."""
    sequence = entry.sequence
    if not sequence:
        raise Reject("the entry has no sequence (no lines after its SQ line)")
    foreign = set(sequence) - SEQUENCE_ALPHABET
    if foreign:
        raise Reject(
            "the sequence has letters that are not amino-acid codes: "
            + _positions(sequence, foreign)
        )
    if entry.sequence_length != len(sequence):
        raise Reject(
            f"the sequence has {len(sequence)} residues but the ID line declares "
            f"{entry.sequence_length}"
        )
    if entry.seqinfo is None:
        return  # no SQ line: nothing more is declared to check against
    declared_length, _, declared_crc = entry.seqinfo
    if declared_length != len(sequence):
        raise Reject(
            f"the sequence has {len(sequence)} residues but the SQ line declares {declared_length}"
        )
    # Biopython writes "CRC-" before the 16 hexadecimal digits the SQ line holds.
    actual_crc = crc64(sequence).removeprefix("CRC-")
    if declared_crc and actual_crc.upper() != declared_crc.upper():
        raise Reject(
            f"the sequence's CRC64 is {actual_crc} but the SQ line declares {declared_crc}: "
            "the sequence was changed or damaged after the checksum was computed"
        )


def read_checked(record: HookRecord) -> SwissProt.Record:
    """Parse the record's entry, rejecting what no feature can be computed from."""
    path = entry_file(record)
    entry = read_entry(path)
    check_identity(record, entry, path.name)
    check_sequence(entry)
    return entry


def sequence_mass_da(sequence: str) -> float | None:
    """Average mass of the protein in daltons; None when it has ambiguity codes (B, Z, J, X)."""
    if not set(sequence) <= _WEIGHED_LETTERS:
        return None
    return round(molecular_weight(sequence, seq_type="protein"), 2)


@hook
def validate_sequence(record: HookRecord) -> None:
    """Pass entries whose sequence is made of amino-acid codes and matches its declarations."""
    read_checked(record)


@hook
def extract_features(record: HookRecord) -> dict[str, Any]:
    """One feature row per entry: what the protein is, where it comes from, its keywords."""
    entry = read_checked(record)
    return {
        "entry_name": entry.entry_name,
        "reviewed": entry.data_class == "Reviewed",
        "sequence_length": len(entry.sequence),
        "mass_da": sequence_mass_da(entry.sequence),
        "organism": organism_name(entry),
        "taxonomy_id": taxonomy_id(entry),
        "lineage": entry.organism_classification,
        "keywords": entry.keywords,
    }
