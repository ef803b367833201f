"""Ingest PDB entries straight from the RCSB web services, without a local mirror.

discover lists entry ids: every current entry from the holdings service, or, with
`since`, the entries released or revised after it from the Search API (paged). fetch
downloads each entry's gzipped mmCIF from the file server and records the same metadata as
the mirror ingester, read from the downloaded file with the same helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Annotated, Any

from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.types import IngesterRecord, RecordRef
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from osa_dagster.conventions.http import HttpClient, HttpResponse, NotFound, UpstreamError
from osa_dagster.conventions.pdb.ingester import entry_metadata

log = logging.getLogger(__name__)

HOLDINGS_URL = "https://data.rcsb.org/rest/v1/holdings/current/entry_ids"
SEARCH_URL = "https://search.rcsb.org/rcsbsearch/v2/query"
FILES_URL = "https://files.rcsb.org/download"

# The Search API returns at most 10,000 hits per request.
MAX_PAGE_ROWS = 10_000

# Classic ids ("1ABC") and the extended ones the wwPDB has announced ("pdb_00001abc"); the
# pattern also keeps an upstream id from smuggling "/" or ".." into a download URL.
EntryId = Annotated[str, Field(pattern=r"^(?:[0-9][A-Za-z0-9]{3}|pdb_[0-9]{4}[A-Za-z0-9]{4})$")]
_ENTRY_ID = TypeAdapter(EntryId)
_HOLDINGS = TypeAdapter(list[EntryId])


class _SearchHit(BaseModel):
    model_config = ConfigDict(extra="ignore")

    identifier: EntryId


class _SearchPage(BaseModel):
    """One answer of the Search API; fields we do not use (score, query_id...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    total_count: int = Field(ge=0)
    result_set: list[_SearchHit]


@ingester(name="pdb_rcsb", max_file_mb=100)
class RcsbIngester(Ingester):
    """PDB entries from RCSB's holdings, search and file services; `source_id` is the id
    in upper case ("1UBI"), as for the mirror ingester.

    The three base URLs are configurable (a regional mirror, or a test server).
    `requests_per_second` is per host and shared by the `download_threads` that fetch
    a batch. A 404 on an entry's file (an entry obsoleted since discover) fails that
    record only; any other upstream failure, after the client's retries, fails the batch,
    so a re-run fetches it again instead of publishing a batch with holes.
    """

    def __init__(
        self,
        *,
        holdings_url: str = HOLDINGS_URL,
        search_url: str = SEARCH_URL,
        files_url: str = FILES_URL,
        page_rows: int = MAX_PAGE_ROWS,
        download_threads: int = 4,
        requests_per_second: float | None = 10.0,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        max_backoff_s: float = 60.0,
        backoff_base_s: float = 1.0,
    ) -> None:
        if not 1 <= page_rows <= MAX_PAGE_ROWS:
            raise ValueError(f"page_rows must be within 1..{MAX_PAGE_ROWS}, got {page_rows}")
        if download_threads < 1:
            raise ValueError(f"download_threads must be >= 1, got {download_threads}")
        super().__init__(
            holdings_url=holdings_url,
            search_url=search_url,
            files_url=files_url,
            page_rows=page_rows,
            download_threads=download_threads,
            requests_per_second=requests_per_second,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            max_backoff_s=max_backoff_s,
            backoff_base_s=backoff_base_s,
        )
        self.holdings_url = holdings_url
        self.search_url = search_url
        self.files_url = files_url.rstrip("/")
        self.page_rows = page_rows
        self.download_threads = download_threads
        self.client = HttpClient(
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            max_backoff_s=max_backoff_s,
            requests_per_second=requests_per_second,
            backoff_base_s=backoff_base_s,
        )

    # discover

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Entry ids: all current ones in id order, or those released/revised after `since`
        (naive means UTC) in the order the Search API pages them."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if limit == 0:
            return
        ids = self._all_current_ids() if since is None else self._ids_changed_since(since)
        for found, pdb_id in enumerate(ids, start=1):
            yield RecordRef(source_id=pdb_id.upper())
            if limit is not None and found >= limit:
                return

    def _all_current_ids(self) -> Iterator[str]:
        answer = self.client.get_json(self.holdings_url)
        try:
            ids = _HOLDINGS.validate_python(answer)
        except ValidationError as error:
            raise UpstreamError(
                self.holdings_url, f"expected a JSON list of PDB entry ids: {_first_error(error)}"
            ) from None
        return iter(sorted({pdb_id.upper() for pdb_id in ids}))

    def _ids_changed_since(self, since: datetime) -> Iterator[str]:
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        seen: set[str] = set()
        start = 0
        while True:
            response = self.client.post(self.search_url, self._search_query(since, start))
            # The Search API answers 204 with no body when nothing matches.
            if response.status == 204:
                return
            page = _parse_search_page(response)
            for hit in page.result_set:
                pdb_id = hit.identifier.upper()
                # Hits with equal sort keys may shift between pages; never yield one twice.
                if pdb_id not in seen:
                    seen.add(pdb_id)
                    yield pdb_id
            start += len(page.result_set)
            if start >= page.total_count:
                return
            if not page.result_set:
                raise UpstreamError(
                    response.url,
                    f"page at start={start} is empty although total_count is {page.total_count}",
                )

    def _search_query(self, since: datetime, start: int) -> dict[str, Any]:
        after = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        changed_after = [
            {
                "type": "terminal",
                "service": "text",
                "parameters": {"attribute": attribute, "operator": "greater", "value": after},
            }
            # A first release is not a revision in every entry's history: ask for both.
            for attribute in (
                "rcsb_accession_info.initial_release_date",
                "rcsb_accession_info.revision_date",
            )
        ]
        return {
            "query": {"type": "group", "logical_operator": "or", "nodes": changed_after},
            "request_options": {
                "paginate": {"start": start, "rows": self.page_rows},
                # A fixed order keeps pages from overlapping or skipping while we page.
                "sort": [
                    {"sort_by": "rcsb_accession_info.initial_release_date", "direction": "asc"}
                ],
            },
            "return_type": "entry",
        }

    # fetch

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Download each entry's <ID>.cif.gz (stored as sent) and read its header."""
        pool = ThreadPoolExecutor(self.download_threads, thread_name_prefix="rcsb-fetch")
        try:
            for record in pool.map(lambda ref: self._fetch_one(ref, ctx), refs):
                if record is not None:
                    yield record
        finally:
            # After a failure, downloads not yet started are pointless: the batch has failed.
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch_one(self, ref: RecordRef, ctx: FetchContext) -> IngesterRecord | None:
        pdb_id = ref.source_id
        try:
            _ENTRY_ID.validate_python(pdb_id)
        except ValidationError:
            ctx.fail(pdb_id, f"{pdb_id!r} is not a PDB entry id")
            return None
        file_name = f"{pdb_id.upper()}.cif.gz"
        url = f"{self.files_url}/{file_name}"
        try:
            download = self.client.download_file(url, ctx, pdb_id, file_name.lower())
        except NotFound as error:
            ctx.fail(pdb_id, f"no mmCIF file upstream: {error}")
            return None
        record_dir = ctx.record_dir(pdb_id)
        metadata = entry_metadata(record_dir, record_dir / download.ref.name, pdb_id.upper())
        # The file server's Last-Modified is the time of the upstream copy, as rsync -t
        # keeps it in a mirror.
        metadata = metadata.model_copy(
            update={
                "source_path": file_name,
                "source_modified_at": download.last_modified or metadata.source_modified_at,
            }
        )
        return IngesterRecord(
            source_id=pdb_id, metadata=metadata.model_dump(mode="json"), files=[download.ref]
        )


def _parse_search_page(response: HttpResponse) -> _SearchPage:
    try:
        return _SearchPage.model_validate(response.json())
    except ValidationError as error:
        raise UpstreamError(
            response.url, f"not a Search API result page: {_first_error(error)}", response.status
        ) from None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(map(str, first["loc"])) or "the answer"
    return f"{where}: {first['msg']} ({error.error_count()} problem(s))"
