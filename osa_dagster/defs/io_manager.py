"""Loading a batch by asset key, for people: `defs.load_asset_value(key, partition_key=...)`.

The assets hand Dagster nothing during runs (each step reads the store by partition,
which keeps the orchestrator's memory flat), so this IO manager stores nothing; it only
loads, and what it loads are the lazy views of osa_dagster.batch.views: the raw records
(raw_batch), a hook's outcomes (hook_outcomes/<hook>) and the published records with
their features (published_records, features). No pickles: every view reads the store's
own JSON documents or the records database.
"""

from __future__ import annotations

import dagster as dg

from osa_dagster.batch.views import HookOutcomes, PublishedRecords, RawRecords
from osa_dagster.defs.metadata import HOOK_VERSION_METADATA
from osa_dagster.defs.resources import ArtifactStoreResource, RecordsDatabaseResource
from osa_dagster.storage.layout import BatchLayout

IO_MANAGER_KEY = "batch_views"

BatchView = RawRecords | HookOutcomes | PublishedRecords


class BatchViewsIOManager(dg.ConfigurableIOManager):
    """Views of one batch's artifacts by asset key; see the module doc."""

    artifact_store: ArtifactStoreResource
    records_db: RecordsDatabaseResource

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        # Assets return MaterializeResult, for which Dagster calls no IO manager: a value
        # reaching here is an asset that broke the rule of handing Dagster nothing.
        raise TypeError(
            f"{context.asset_key.to_user_string()} returned a value; the batch assets write "
            "the artifact store themselves and return MaterializeResult"
        )

    def load_input(self, context: dg.InputContext) -> BatchView:
        convention, kind, *rest = context.asset_key.path
        partition = context.asset_partition_key
        layout = BatchLayout(convention, partition)
        if kind == "raw_batch":
            return RawRecords(self.artifact_store.get(), layout)
        if kind == "hook_outcomes" and len(rest) == 1:
            # The version the definitions run now, which the hook's asset carries.
            upstream = context.upstream_output
            version = (upstream.definition_metadata if upstream else {}).get(HOOK_VERSION_METADATA)
            return HookOutcomes(
                self.artifact_store.get(),
                layout,
                rest[0],
                None if version is None else str(version),
            )
        if kind in ("published_records", "features"):
            return PublishedRecords(self.records_db.get(), convention, partition)
        raise ValueError(f"{context.asset_key.to_user_string()} is not an asset of a batch")
