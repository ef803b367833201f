"""The geo convention: GEO records as SOFT files, checked and described by a streaming reader.

`CONVENTIONS` holds "geo", which ingests a local folder of SOFT files
(``OSA_SOURCES=geo=/data/geo``; default: the three bundled real records in data/), or with
``OSA_SOURCES=geo=ncbi`` series straight from NCBI (E-utilities and GEO's FTP site;
NCBI_API_KEY raises the rate from 3 to 10 requests/s).

Memory ladders come from measurements of the bundled records, one process each, through
the real hook entrypoint (``python -m osa_dagster.conventions.geo.measure``): both hooks
peak at 34 MB RSS on every record, the 0.1 MB GSM11805 as the 10 MB GSE781 family file
(57 MB of text), the interpreter and its imports included: the reader keeps one entity's
attributes and never a table. A 128 MB base leaves ~90 MB for the libraries a container
charges too. What can still grow is a single line (a damaged file that decompresses into
gigabytes without a newline); the 1 GB cap ends that as errored rather than at 8 GB.
"""

from __future__ import annotations

from osa_dagster import __version__
from osa_dagster.conventions.base import Convention, HookImage, IngesterSource
from osa_dagster.conventions.geo.ingester import GeoFolderIngester, GeoRecordMetadata
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command

HOOK_IMAGE = HookImage(name=f"osa-hooks-geo:{__version__}")

VALIDATE_SOFT = HookSpec(
    name="validate_soft",
    command=sdk_hook_command("osa_dagster.conventions.geo.hooks:validate_soft"),
    image=HOOK_IMAGE.name,
    memory=MemoryPolicy(base_mb=128, cap_mb=1024),
    timeout_s=1800,
)

EXTRACT_FEATURES = HookSpec(
    name="extract_features",
    command=sdk_hook_command("osa_dagster.conventions.geo.hooks:extract_features"),
    image=HOOK_IMAGE.name,
    memory=MemoryPolicy(base_mb=128, cap_mb=1024),
    timeout_s=1800,
    emits_features=True,
)

CONVENTIONS = [
    Convention(
        name="geo",
        description="GEO series, datasets and samples (SOFT files)",
        ingester=GeoFolderIngester,
        hooks=(VALIDATE_SOFT, EXTRACT_FEATURES),
        record_schema=GeoRecordMetadata,
        # 6.5M samples in 6,500 batches; shards of 250 records (a sample is ~10 ms of hook
        # work, a series' family file seconds to minutes). See the README, "Partition and
        # shard sizes".
        batch_size=1_000,
        shard_size=250,
        hook_image=HOOK_IMAGE,
        source="folder",
        location_parameter="folder",
        sources={
            "ncbi": IngesterSource(
                ingester="osa_dagster.conventions.geo.eutils:GeoEutilsIngester",
                description="series from NCBI E-utilities and the GEO FTP site",
            )
        },
    )
]
