"""The uniprot convention: UniProtKB entries, checked and described with Biopython.

The convention reads a local flat file or a folder of them (``OSA_SOURCES=uniprot=/data/sprot``;
by default the 100 real Swiss-Prot entries in data/, see data/SOURCES.md), or with
``OSA_SOURCES=uniprot=rest`` the UniProtKB REST API
(reviewed entries; a deployment wanting another query defines its own convention with
`uniprot_convention(ingester=UniProtRestIngester, query=...)`). The same hooks serve both.

Memory ladders come from measurements of the 100 bundled entries in one batch, each hook
through its real entrypoint in a cgroup (``python -m osa_dagster.conventions.uniprot.measure``):
both hooks peak at 36 MB RSS (22 MB charged to the cgroup), nearly all of it the
interpreter and the imports of pydantic and Biopython. A synthetic titin-sized entry
(35,000 residues, 5,400 feature lines; titin is the longest protein in UniProtKB) adds
6 MB. A 128 MB base is thus over 3x what any real entry needs; the cap is there for the
unforeseen.
"""

from __future__ import annotations

from typing import Any

from osa_sdk.authoring import Ingester

from osa_dagster import __version__
from osa_dagster.conventions.base import Convention, HookImage, IngesterSource
from osa_dagster.conventions.uniprot.ingester import UniProtEntryMetadata, UniProtFlatFileIngester
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command

HOOK_IMAGE = HookImage(name=f"osa-hooks-uniprot:{__version__}", requirements=("biopython",))

VALIDATE_SEQUENCE = HookSpec(
    name="validate_sequence",
    command=sdk_hook_command("osa_dagster.conventions.uniprot.hooks:validate_sequence"),
    image=HOOK_IMAGE.name,
    memory=MemoryPolicy(base_mb=128, cap_mb=1024),
    timeout_s=600,
)

EXTRACT_FEATURES = HookSpec(
    name="extract_features",
    command=sdk_hook_command("osa_dagster.conventions.uniprot.hooks:extract_features"),
    image=HOOK_IMAGE.name,
    memory=MemoryPolicy(base_mb=128, cap_mb=1024),
    timeout_s=600,
    emits_features=True,
)


def uniprot_convention(
    *,
    name: str = "uniprot",
    ingester: type[Ingester] = UniProtFlatFileIngester,
    **ingester_config: Any,
) -> Convention:
    """The uniprot convention with another ingester or ingester configuration."""
    return Convention(
        name=name,
        description="UniProtKB entries (flat-file text) from a release file or the REST API",
        ingester=ingester,
        ingester_config=ingester_config,
        hooks=(VALIDATE_SEQUENCE, EXTRACT_FEATURES),
        record_schema=UniProtEntryMetadata,
        # Swiss-Prot in 115 batches, UniProtKB in ~39,800; shards of 2,500 entries (~3.5 s of
        # hook work at 600-750 entries/s against ~0.3 s to start an attempt). See the README,
        # "Partition and shard sizes".
        batch_size=5_000,
        shard_size=2_500,
        hook_image=HOOK_IMAGE,
        source="flatfile",
        location_parameter="path" if ingester is UniProtFlatFileIngester else None,
        sources={
            "rest": IngesterSource(
                ingester="osa_dagster.conventions.uniprot.rest:UniProtRestIngester",
                description="reviewed entries from the REST API",
                location_parameter="base_url",
                location_kind="url",
            )
        },
    )


CONVENTIONS = [uniprot_convention()]
