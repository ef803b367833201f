"""Ingesters for the SDK's tests, importable as ``sdk_sample_ingesters:NAME``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from osa_sdk import FetchContext, Ingester, IngesterRecord, RecordRef, ingester


@ingester(name="scripted", max_file_mb=1 / 1024)  # 1024 bytes
class ScriptedIngester(Ingester):
    """Fetches what each ref's `extra` describes; files over 1000 bytes are too big.

    extra = {"files": {name: size_in_bytes}, "fail": "error", "drop": true}: files are
    written first, then the ref is failed, dropped (neither returned nor failed) or returned.
    """

    def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
        return [RecordRef(source_id=i) for i in self.config.get("ids", [])][:limit]

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterable[IngesterRecord]:
        for ref in refs:
            files = [
                ctx.add_bytes(ref.source_id, name, b"x" * size)
                for name, size in ref.extra.get("files", {}).items()
            ]
            if "fail" in ref.extra:
                ctx.fail(ref.source_id, ref.extra["fail"])
            elif not ref.extra.get("drop"):
                yield IngesterRecord(
                    source_id=ref.source_id,
                    metadata={"title": self.config.get("title", "")},
                    files=files,
                )
