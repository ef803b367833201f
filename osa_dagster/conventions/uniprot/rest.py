"""Ingest UniProtKB entries from its REST API (https://rest.uniprot.org).

discover pages through ``/uniprotkb/search`` (up to 500 accessions a page, following the
``Link: <...>; rel="next"`` cursor); fetch gets each entry's flat-file text from
``/uniprotkb/<accession>.txt`` and writes it as ``<accession>.dat``, the same file the
local flat-file ingester writes, so both share the hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from urllib.parse import quote

from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.types import IngesterFileRef, IngesterRecord, RecordRef
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osa_dagster.conventions.http import HttpClient, HttpResponse, UpstreamError
from osa_dagster.conventions.uniprot.ingester import (
    ENTRY_FILE_SUFFIX,
    EntryParseError,
    entry_metadata,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://rest.uniprot.org"
DEFAULT_QUERY = "reviewed:true"
MAX_PAGE_SIZE = 500
"""The most accessions UniProt returns per search page."""
RELEASE_HEADER = "X-UniProt-Release"

_RELEASE = "release"  # RecordRef.extra key: the release the search listed the entry in


class _SearchHit(BaseModel):
    model_config = ConfigDict(extra="ignore")

    primary_accession: str = Field(alias="primaryAccession", min_length=1)


class _SearchPage(BaseModel):
    """The part of a ``/uniprotkb/search?format=json`` answer that discover reads."""

    model_config = ConfigDict(extra="ignore")

    results: list[_SearchHit]


def search_query(query: str, since: datetime | None) -> str:
    """`query` restricted to entries modified on or after the day of `since` (naive = UTC).

    UniProt dates entries by the day, so an entry changed on the day of `since` is
    included: re-ingesting it is harmless, missing it is not.
    """
    if since is None:
        return query
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    day = since.astimezone(UTC).date().isoformat()
    return f"({query}) AND (date_modified:[{day} TO *])"


def _page_accessions(response: HttpResponse) -> list[str]:
    try:
        page = _SearchPage.model_validate(response.json())
    except ValidationError as error:
        raise UpstreamError(
            response.url,
            f"answer is not a UniProtKB search page (a 'results' list of entries with a "
            f"'primaryAccession'): {error.errors()[0]['msg']} at "
            f"{'.'.join(str(part) for part in error.errors()[0]['loc'])}",
            response.status,
        ) from None
    return [hit.primary_accession for hit in page.results]


@ingester(name="uniprot_rest", max_file_mb=20)
class UniProtRestIngester(Ingester):
    """UniProtKB entries matching a search `query`; `source_id` is the primary accession.

    A 404 for an entry (deleted or merged away since discover) makes that record errored;
    other client errors (4xx) of one entry do too. Failures that outlast the HTTP client's
    retries (429, 5xx, dropped connections) fail the whole fetch instead, so that a
    service outage is retried later rather than recorded against every entry.

    max_file_mb=20: the largest entries (titin, ~35,000 residues) are around 1 MB of text.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        query: str = DEFAULT_QUERY,
        page_size: int = MAX_PAGE_SIZE,
        with_fasta: bool = False,
        requests_per_second: float | None = None,
        timeout_s: float = 30.0,
        max_attempts: int = 5,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, not {page_size}")
        super().__init__(
            base_url=base_url,
            query=query,
            page_size=page_size,
            with_fasta=with_fasta,
            requests_per_second=requests_per_second,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
        )
        self.base_url = base_url.rstrip("/")
        self.query = query
        self.page_size = page_size
        self.with_fasta = with_fasta
        self.requests_per_second = requests_per_second
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts

    def _client(self) -> HttpClient:
        return HttpClient(
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            requests_per_second=self.requests_per_second,
        )

    def entry_url(self, accession: str, extension: str) -> str:
        return f"{self.base_url}/uniprotkb/{quote(accession, safe='')}.{extension}"

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Accessions in the order UniProt lists them, at most `limit`.

        Every page must come from one release: a release published while paging would
        mix two listings, so discover then fails and asks for a new plan.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if limit == 0:
            return
        url: str | None = f"{self.base_url}/uniprotkb/search"
        params: dict[str, str | int] | None = {
            "query": search_query(self.query, since),
            "format": "json",
            "fields": "accession",
            "size": min(self.page_size, limit) if limit is not None else self.page_size,
        }
        release: str | None = None
        found = 0
        with self._client() as client:
            while url is not None:
                response = client.get(url, params=params)
                page_release = response.headers.get(RELEASE_HEADER)
                if release is not None and page_release not in (None, release):
                    raise UpstreamError(
                        response.url,
                        f"UniProt release changed from {release} to {page_release} while "
                        "paging through the search: plan again",
                    )
                release = release or page_release
                extra = {_RELEASE: release} if release else {}
                for accession in _page_accessions(response):
                    yield RecordRef(source_id=accession, version=release, extra=extra)
                    found += 1
                    if limit is not None and found >= limit:
                        return
                # The next link carries the query and the cursor.
                url, params = response.links().get("next"), None
        log.info("UniProt search %r (release %s): %d entries", self.query, release, found)

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Write each entry's flat-file text as ``<accession>.dat`` (and .fasta if asked)."""
        with self._client() as client:
            for ref in refs:
                record = self._fetch_one(client, ref, ctx)
                if record is not None:
                    yield record

    def _fetch_one(
        self, client: HttpClient, ref: RecordRef, ctx: FetchContext
    ) -> IngesterRecord | None:
        accession = ref.source_id
        try:
            response = client.get(self.entry_url(accession, "txt"))
            try:
                metadata = entry_metadata(
                    response.body,
                    release=response.headers.get(RELEASE_HEADER) or ref.extra.get(_RELEASE),
                    source=response.url,
                )
            except EntryParseError as error:
                ctx.fail(
                    accession,
                    f"{response.url}: the answer is not a UniProt flat-file entry ({error})",
                )
                return None
            files: list[IngesterFileRef] = [
                ctx.add_bytes(accession, accession + ENTRY_FILE_SUFFIX, response.body)
            ]
            if self.with_fasta:
                fasta_url = self.entry_url(accession, "fasta")
                files.append(client.download(fasta_url, ctx, accession, accession + ".fasta"))
        except UpstreamError as error:
            if error.status is None or not 400 <= error.status < 500:
                raise
            # 404 (the entry is gone) and other refusals concern this entry alone.
            ctx.fail(accession, str(error))
            return None
        return IngesterRecord(
            source_id=accession, metadata=metadata.model_dump(mode="json"), files=files
        )
