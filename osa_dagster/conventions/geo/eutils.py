"""Ingest GEO series from NCBI: discovered with E-utilities, fetched from GEO's FTP site.

discover runs one esearch on db=gds with the history server (usehistory=y), then pages
through the result with esummary (WebEnv + query_key, retstart/retmax) to turn GDS UIDs
into GSE accessions. fetch downloads each series' family SOFT file, as it is, from
``<ftp_base>/series/GSE<n>nnn/GSE<n>/soft/GSE<n>_family.soft.gz``.

NCBI allows 3 requests per second without an API key and 10 with one: the key comes from
the `api_key` setting or NCBI_API_KEY and is sent to E-utilities only, never to the FTP
host, and never appears in error messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.types import IngesterRecord, RecordRef

from osa_dagster.conventions.geo.ingester import MAX_FILE_MB, record_metadata
from osa_dagster.conventions.geo.soft import SERIES, is_accession
from osa_dagster.conventions.http import HttpClient, NotFound, UpstreamError

EUTILS_BASE = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils"
GEO_FTP_BASE = "https://ftp.ncbi.nlm.nih.gov/geo"
API_KEY_ENV = "NCBI_API_KEY"
REQUESTS_PER_SECOND = 3.0
REQUESTS_PER_SECOND_WITH_KEY = 10.0
SERIES_TERM = "gse[ETYP]"
"""Every GEO series: the entry-type field of the gds database."""
ESUMMARY_PAGE = 500


def series_folder(accession: str) -> str:
    """GEO's folder of a series: its number's last three digits as 'nnn' (GSE781 -> GSEnnn,
    GSE12345 -> GSE12nnn)."""
    if not is_accession(SERIES, accession):
        raise ValueError(f"{accession!r} is not a GEO series accession (GSE and a number)")
    return f"GSE{accession[3:-3]}nnn"


def family_soft_url(ftp_base: str, accession: str) -> str:
    folder = series_folder(accession)
    return f"{ftp_base.rstrip('/')}/series/{folder}/{accession}/soft/{accession}_family.soft.gz"


def _field(answer: Any, path: Sequence[str], url: str) -> Any:
    value = answer
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise UpstreamError(url, f"the answer has no {'.'.join(path)}: {str(answer)[:200]!r}")
        value = value[key]
    return value


def _count(answer: Any, path: Sequence[str], url: str) -> int:
    value = _field(answer, path, url)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UpstreamError(url, f"{'.'.join(path)} is not a number: {value!r}") from None


@ingester(name="geo_eutils", max_file_mb=MAX_FILE_MB)
class GeoEutilsIngester(Ingester):
    """GEO series from NCBI; `source_id` is the series accession ("GSE781").

    `discover(since=...)` asks for series made public since that day (``datetype`` pdat,
    E-utilities dates have a resolution of one day, so the day of `since` is included).
    `term` narrows the search with any Entrez query on db=gds.

    fetch makes a record `errored` when GEO has no family file for it (404), and lets the
    batch go on; any other failure that outlasts the client's retries (the service down,
    bodies cut short) fails the fetch, so the step is retried as a whole later.
    """

    def __init__(
        self,
        eutils_base: str = EUTILS_BASE,
        ftp_base: str = GEO_FTP_BASE,
        term: str = SERIES_TERM,
        datetype: str = "pdat",
        page_size: int = ESUMMARY_PAGE,
        api_key: str | None = None,
        email: str | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 5,
        max_backoff_s: float = 60.0,
    ) -> None:
        # The key stays out of self.config, which is shown and stored.
        super().__init__(
            eutils_base=eutils_base,
            ftp_base=ftp_base,
            term=term,
            datetype=datetype,
            page_size=page_size,
            email=email,
        )
        if not 0 < page_size <= 10_000:
            raise ValueError(f"page_size must be 1..10000 (E-utilities' retmax), not {page_size}")
        self.eutils_base = eutils_base.rstrip("/")
        self.ftp_base = ftp_base.rstrip("/")
        self.term = term
        self.datetype = datetype
        self.page_size = page_size
        self.email = email
        self._api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.http = HttpClient(
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            max_backoff_s=max_backoff_s,
            requests_per_second=(
                REQUESTS_PER_SECOND_WITH_KEY if self._api_key else REQUESTS_PER_SECOND
            ),
        )

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Series in the order of the search result; at most `limit`."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if limit == 0:
            return
        search: dict[str, str | int] = {
            "db": "gds",
            "term": self.term,
            "usehistory": "y",
            "retmax": 0,
            "retmode": "json",
        }
        if since is not None:
            day = (since if since.tzinfo else since.replace(tzinfo=UTC)).astimezone(UTC)
            # maxdate is required with mindate; a far year means "up to now".
            search.update(datetype=self.datetype, mindate=day.strftime("%Y/%m/%d"), maxdate="3000")
        url = f"{self.eutils_base}/esearch.fcgi"
        answer = self._eutils_json(url, search)
        count = _count(answer, ("esearchresult", "count"), url)
        webenv = _field(answer, ("esearchresult", "webenv"), url)
        query_key = _field(answer, ("esearchresult", "querykey"), url)
        wanted = count if limit is None else min(count, limit)
        found = 0
        retstart = 0
        while found < wanted and retstart < count:
            page = min(self.page_size, count - retstart)
            for ref in self._summaries(webenv, query_key, retstart, page):
                if found >= wanted:
                    return
                found += 1
                yield ref
            retstart += page

    def _summaries(
        self, webenv: str, query_key: str, retstart: int, retmax: int
    ) -> list[RecordRef]:
        url = f"{self.eutils_base}/esummary.fcgi"
        params: dict[str, str | int] = {
            "db": "gds",
            "WebEnv": webenv,
            "query_key": query_key,
            "retstart": retstart,
            "retmax": retmax,
            "retmode": "json",
        }
        answer = self._eutils_json(url, params)
        uids = _field(answer, ("result", "uids"), url)
        if not isinstance(uids, list) or not uids:
            raise UpstreamError(
                url, f"esummary at retstart={retstart} returned no UIDs ({str(uids)[:80]!r})"
            )
        refs = []
        for uid in uids:
            summary = _field(answer, ("result", str(uid)), url)
            accession = _field(summary, ("accession",), url)
            if not isinstance(accession, str):
                raise UpstreamError(url, f"UID {uid} has accession {accession!r}")
            if not is_accession(SERIES, accession):
                continue  # a dataset, platform or sample that a broader `term` matched
            refs.append(
                RecordRef(
                    source_id=accession,
                    extra={"gds_uid": str(uid), "pdat": summary.get("pdat")},
                )
            )
        return refs

    def _eutils_json(self, url: str, params: dict[str, str | int]) -> Any:
        params = {**params, "tool": "osa-dagster"}
        if self.email:
            params["email"] = self.email
        if self._api_key:
            params["api_key"] = self._api_key
        try:
            answer = self.http.get_json(url, params=params)
        except UpstreamError as error:
            raise type(error)(
                self._redacted(error.url),
                self._redacted(str(error).removeprefix(f"{error.url}: ")),
                error.status,
            ) from None
        # E-utilities answer some failures (a bad term, an expired WebEnv) with HTTP 200.
        problem = answer.get("error") if isinstance(answer, Mapping) else None
        result = answer.get("esearchresult") if isinstance(answer, Mapping) else None
        if problem is None and isinstance(result, Mapping):
            problem = result.get("ERROR")
        if problem:
            raise UpstreamError(self._redacted(url), f"E-utilities error: {problem}")
        return answer

    def _redacted(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Download each series' family SOFT file as it is; a 404 fails only that record."""
        for ref in refs:
            accession = ref.source_id
            if not is_accession(SERIES, accession):
                ctx.fail(accession, f"{accession!r} is not a GEO series accession")
                continue
            url = family_soft_url(self.ftp_base, accession)
            name = f"{accession}_family.soft.gz"
            try:
                downloaded = self.http.download_file(url, ctx, accession, name)
            except NotFound as error:
                ctx.fail(accession, f"GEO has no family SOFT file for {accession}: {error}")
                continue
            metadata = record_metadata(
                ctx.record_dir(accession) / name, accession, url, downloaded.last_modified
            )
            yield IngesterRecord(
                source_id=accession,
                metadata=metadata.model_dump(mode="json"),
                files=[downloaded.ref],
            )
