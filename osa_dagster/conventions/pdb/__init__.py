"""The pdb convention: PDB entries from a local mirror or flat folder of mmCIF files (with
OSA_SOURCES=pdb=/data/pdb, the bundled mirror otherwise), or with OSA_SOURCES=pdb=rcsb from
RCSB's web services, checked and described with gemmi.

Memory ladders come from measurements of every bundled entry, one process each
(`python -m osa_dagster.conventions.pdb.measure_memory`, table in README.md):
extract_features peaks under 100 MB on all of them but the ribosome 6ZU5 (~310 MB), so
at a 192 MB base exactly 6ZU5 is OOM-killed and passes one step up, at 384 MB.
"""

from __future__ import annotations

from osa_dagster import __version__
from osa_dagster.conventions.base import Convention, HookImage, IngesterSource
from osa_dagster.conventions.pdb.ingester import PdbEntryMetadata, PdbMirrorIngester
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command

HOOK_IMAGE = HookImage(name=f"osa-hooks-pdb:{__version__}", requirements=("gemmi", "numpy"))

VALIDATE_STRUCTURE = HookSpec(
    name="validate_structure",
    command=sdk_hook_command("osa_dagster.conventions.pdb.hooks:validate_structure"),
    image=HOOK_IMAGE.name,
    # Parsing alone peaks at ~215 MB for the 21 MB 6ZU5 and ~2.3 GB for 3j3q (240 MB),
    # the largest entry of the archive: the cap lets every real entry through.
    memory=MemoryPolicy(base_mb=512, cap_mb=4096),
    timeout_s=600,
)

EXTRACT_FEATURES = HookSpec(
    name="extract_features",
    command=sdk_hook_command("osa_dagster.conventions.pdb.hooks:extract_features"),
    image=HOOK_IMAGE.name,
    memory=MemoryPolicy(base_mb=192, cap_mb=4096),
    timeout_s=600,
    emits_features=True,
)

CONVENTIONS = [
    Convention(
        name="pdb",
        description="PDB entries (mmCIF) from a mirror in the wwPDB divided layout or a flat "
        "folder of .cif/.cif.gz files",
        ingester=PdbMirrorIngester,
        hooks=(VALIDATE_STRUCTURE, EXTRACT_FEATURES),
        record_schema=PdbEntryMetadata,
        # Entries reach gigabytes: small batches (~2,300 for the whole archive), and at most
        # 25 entries per hook attempt chain (~4 s of extract_features) so that one entry's
        # OOM climb keeps few others at the higher rung (see "Partition and shard sizes").
        batch_size=100,
        shard_size=25,
        hook_image=HOOK_IMAGE,
        source="mirror",
        location_parameter="mirror",
        sources={
            "rcsb": IngesterSource(
                ingester="osa_dagster.conventions.pdb.rcsb:RcsbIngester",
                description="entries from the RCSB holdings, search and file services",
            )
        },
    )
]
