"""Hooks of the pdb convention, with gemmi: validate_structure and extract_features.

Both read the record's mmCIF file the same way and reject it for the same reasons, so a
record that one of them cannot use is rejected with one message, whichever runs first.

extract_features builds a dense residue contact map, whose memory grows with the square of
the number of residues: a 100-residue protein needs 10 kB for it, the 14,000-residue
ribosome 6ZU5 200 MB. That is how contact-map analyses hold the map, and it is the hook
that the memory ladder of the engine exists for (see the table in README.md). On the
archive's very largest assemblies (3j3q, ~310,000 residues: ~100 GB) no rung of the ladder
is enough, and those records end as errored once it reaches its cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gemmi
import numpy as np
from osa_sdk.authoring import hook
from osa_sdk.types import HookRecord, Reject

CONTACT_CUTOFF_A = 8.0
"""Two residues are in contact when their representative atoms are closer than this."""
LONG_RANGE_SEPARATION = 24
"""Sequence separation from which a contact within a chain is long-range (CASP definition)."""
REPRESENTATIVE_ATOMS = ("CA", "C4'")
"""The atom standing for a residue: C-alpha for amino acids, C4' for nucleotides."""

# Distances are computed for this many residue pairs at a time (block rows x all columns),
# so the float64 temporaries stay near 8 MB however big the structure is: the contact
# map itself, one byte per pair, is the only part that grows with the square of the size.
_PAIRS_PER_BLOCK = 1 << 18

# gemmi's polymer types in the words of the mmCIF dictionary (_entity_poly.type), which
# curators know.
_POLYMER_TYPE_NAMES = {
    gemmi.PolymerType.PeptideL: "polypeptide(L)",
    gemmi.PolymerType.PeptideD: "polypeptide(D)",
    gemmi.PolymerType.Dna: "polydeoxyribonucleotide",
    gemmi.PolymerType.Rna: "polyribonucleotide",
    gemmi.PolymerType.DnaRnaHybrid: "polydeoxyribonucleotide/polyribonucleotide hybrid",
    gemmi.PolymerType.SaccharideD: "polysaccharide(D)",
    gemmi.PolymerType.SaccharideL: "polysaccharide(L)",
    gemmi.PolymerType.Pna: "peptide nucleic acid",
    gemmi.PolymerType.CyclicPseudoPeptide: "cyclic-pseudo-peptide",
    gemmi.PolymerType.Other: "other",
    gemmi.PolymerType.Unknown: "other",
}


@dataclass
class CheckedStructure:
    """A structure that has a model with atoms and at least one polymer chain."""

    structure: gemmi.Structure
    model: gemmi.Model
    polymers: list[gemmi.ResidueSpan]
    """The polymer part of each chain of the first model that has one, in file order."""


def structure_file(record: HookRecord) -> Path:
    """The record's one mmCIF file (.cif or .cif.gz)."""
    found = [p for p in record.files() if p.name.endswith((".cif", ".cif.gz"))]
    if not found:
        names = ", ".join(p.name for p in record.files()) or "none"
        raise Reject(f"the record has no mmCIF file (.cif or .cif.gz); its files: {names}")
    if len(found) > 1:
        raise Reject(
            "the record has several mmCIF files, so it is unclear which one is the entry: "
            + ", ".join(p.name for p in found)
        )
    return found[0]


def read_checked(record: HookRecord) -> CheckedStructure:
    """Parse the record's structure, rejecting what no feature can be computed from."""
    path = structure_file(record)
    try:
        structure = gemmi.read_structure(str(path), format=gemmi.CoorFormat.Mmcif)
    except (RuntimeError, ValueError) as error:
        # gemmi's message names the line or the compression problem; the first sentence
        # says what it means for the entry.
        raise Reject(
            f"{path.name} cannot be read as mmCIF, the file is damaged, truncated or not "
            f"mmCIF ({error})"
        ) from None
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise Reject(
            f"{path.name} has no atomic model: the entry has a header but no coordinates "
            "(_atom_site is missing or empty)"
        )
    # Files converted from the PDB format may lack entity records; without them gemmi
    # cannot tell polymer residues from ligands.
    structure.setup_entities()
    model = structure[0]
    polymers = [chain.get_polymer() for chain in model]
    polymers = [span for span in polymers if len(span) > 0]
    if not polymers:
        raise Reject(
            f"{path.name} has no polymer: none of its {len(model)} chains is a protein or "
            "nucleic-acid chain (only ligands, ions or water)"
        )
    return CheckedStructure(structure, model, polymers)


@hook
def validate_structure(record: HookRecord) -> None:
    """Pass entries gemmi reads that have a model with atoms and a polymer chain."""
    read_checked(record)


@hook
def extract_features(record: HookRecord) -> dict[str, Any]:
    """One feature row per entry: what the experiment and the model are, and their contacts."""
    checked = read_checked(record)
    structure, model = checked.structure, checked.model
    cell = structure.cell
    crystal = cell.is_crystal()
    return {
        # gemmi joins the methods of multi-method entries: "X-RAY DIFFRACTION; NEUTRON ...".
        "method": dict(structure.info).get("_exptl.method"),
        # gemmi gives 0 when no resolution is recorded (NMR, most PDB-format conversions).
        "resolution_a": structure.resolution or None,
        "models": len(structure),
        "polymer_chains": len(checked.polymers),
        "polymer_residues": sum(len(span) for span in checked.polymers),
        "atoms": model.count_atom_sites(),
        "polymer_types": sorted(
            {_POLYMER_TYPE_NAMES[span.check_polymer_type()] for span in checked.polymers}
        ),
        # NMR and EM entries carry a placeholder symmetry (P 1, cell 1 1 1 90 90 90).
        "spacegroup": (structure.spacegroup_hm or None) if crystal else None,
        "cell": [cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma] if crystal else None,
        **contact_summary(checked.polymers),
    }


def contact_summary(polymers: list[gemmi.ResidueSpan]) -> dict[str, int]:
    """Residue contacts of the first model, from its dense contact map.

    Residues without a representative atom (unresolved, or a sugar in a polymer) are left
    out. Sequence separation uses label_seq (the position in the entity sequence, gaps
    included) and falls back to the author's residue number.
    """
    coordinates: list[tuple[float, float, float]] = []
    chain_index: list[int] = []
    sequence_position: list[int] = []
    for index, span in enumerate(polymers):
        for residue in span:
            atom = next(
                (a for name in REPRESENTATIVE_ATOMS if (a := residue.find_atom(name, "*"))),
                None,
            )
            label_seq = residue.label_seq
            position = label_seq if label_seq is not None else residue.seqid.num
            # Without a number (gemmi leaves it unset for none read from a file) a residue
            # has no sequence separation to count.
            if atom is None or position is None:
                continue
            coordinates.append((atom.pos.x, atom.pos.y, atom.pos.z))
            chain_index.append(index)
            sequence_position.append(position)

    xyz = np.asarray(coordinates, dtype=np.float64).reshape(-1, 3)
    contacts = contact_map(xyz, CONTACT_CUTOFF_A)
    first, second = np.nonzero(contacts)
    # The map is symmetric and its diagonal is set: count each pair once.
    upper = first < second
    first, second = first[upper], second[upper]
    chains = np.asarray(chain_index, dtype=np.int64)
    positions = np.asarray(sequence_position, dtype=np.int64)
    same_chain = chains[first] == chains[second]
    separation = np.abs(positions[first] - positions[second])
    return {
        "contact_residues": len(xyz),
        "contacts_8a": len(first),
        "interchain_contacts_8a": int(np.count_nonzero(~same_chain)),
        "long_range_contacts_8a": int(
            np.count_nonzero(same_chain & (separation >= LONG_RANGE_SEPARATION))
        ),
    }


def contact_map(xyz: np.ndarray, cutoff: float) -> np.ndarray:
    """The n x n boolean map of points closer than `cutoff` (each point touches itself)."""
    n = len(xyz)
    contacts = np.empty((n, n), dtype=np.bool_)
    rows = max(1, _PAIRS_PER_BLOCK // max(n, 1))
    for start in range(0, n, rows):
        block = xyz[start : start + rows]
        difference = block[:, None, :] - xyz[None, :, :]
        squared = np.einsum("ijk,ijk->ij", difference, difference)
        np.less(squared, cutoff * cutoff, out=contacts[start : start + rows])
    return contacts
