"""Asset backfills of a convention's batches, launched through a running Dagster webserver.

Dagster has `dagster job backfill` (one run of the ingest job per partition) but no asset
backfill command. An asset backfill is what the UI's "Materialize..." launches: the backfill
daemon launches its runs (as many batches per run as the assets' backfill policy allows)
and follows them on the Backfills page. The webserver's GraphQL mutation
`launchPartitionBackfill` launches one, so this module talks to the webserver only and needs
no access to the instance: an operator can run it from any machine that reaches the UI.

    osa backfill pdb KEY1 KEY2             the given batches
    osa backfill pdb --from K1 --to K2     a range, in the order the batches were planned
    osa backfill pdb --failed              batches that failed or were never materialised
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from osa_dagster.settings import Settings

# Where `dagster dev` and `make ui` serve by default; OSA_WEBSERVER_URL says otherwise.
DEFAULT_WEBSERVER_URL: str = Settings.model_fields["webserver_url"].default
REQUEST_TIMEOUT_S = 60.0
WAIT_POLL_S = 2.0
# A backfill in one of these states launches nothing more. COMPLETED is what job backfills
# launched from the CLI end in; asset backfills end in COMPLETED_SUCCESS or COMPLETED_FAILED.
FINISHED_STATUSES = frozenset(
    {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
)
SUCCESSFUL_STATUSES = frozenset({"COMPLETED", "COMPLETED_SUCCESS"})
# Dagster's run tags naming the batches a run covers (dagster._core.storage.tags).
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

GROUP_ASSETS_QUERY = """
query OsaGroupAssets {
  assetNodes { assetKey { path } groupName isPartitioned }
}
"""

PARTITIONS_QUERY = """
query OsaConventionPartitions($assetKeys: [AssetKeyInput!], $withStatuses: Boolean!) {
  assetNodes(assetKeys: $assetKeys) {
    assetKey { path }
    partitionKeysByDimension { partitionKeys }
    assetPartitionStatuses @include(if: $withStatuses) {
      __typename
      ... on DefaultPartitionStatuses {
        failedPartitions
        unmaterializedPartitions
        materializingPartitions
      }
    }
  }
}
"""

LAUNCH_MUTATION = """
mutation OsaLaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PartitionKeysNotFoundError { partitionKeys }
    ... on Error { message }
  }
}
"""

STATUS_QUERY = """
query OsaBackfillStatus($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill { status runs { runId status } }
    ... on Error { message }
  }
}
"""

# The runs that may cover a convention's batches: those tagged with it (its ingest job, `osa
# backfill`) and those of the implicit asset job (the UI's materialisations and backfills).
RUNS_QUERY = """
query OsaConventionRuns($filter: RunsFilter!, $limit: Int!) {
  runsOrError(filter: $filter, limit: $limit) {
    __typename
    ... on Runs { results { runId status creationTime tags { key value } } }
    ... on Error { message }
  }
}
"""
ASSET_JOB_NAME = "__ASSET_JOB"
# Enough runs to cover every batch's latest one: 2,000 batches in runs of 20 is 100 runs.
RUNS_LOOKED_AT = 5000
FAILED_RUN_STATUSES = frozenset({"FAILURE", "CANCELED"})
UNFINISHED_RUN_STATUSES = frozenset(
    {"QUEUED", "NOT_STARTED", "MANAGED", "STARTING", "STARTED", "CANCELING"}
)
# Dagster refuses longer backfill titles.
MAX_TITLE_CHARS = 100


class BackfillError(RuntimeError):
    """The webserver refused or failed a request; the message says what and why."""


class PartitionSelection(BaseModel):
    """Which batches to backfill: explicit keys, a key range, or the failed or missing ones."""

    keys: list[str] = []
    first: str | None = None
    last: str | None = None
    failed_or_missing: bool = False

    @model_validator(mode="after")
    def _one_way_of_selecting(self) -> PartitionSelection:
        ways = (
            bool(self.keys),
            self.first is not None or self.last is not None,
            self.failed_or_missing,
        )
        if sum(ways) != 1:
            raise ValueError(
                "select partitions one way: KEYS, or --from/--to, or --failed "
                f"(got keys={self.keys}, from={self.first}, to={self.last}, "
                f"failed={self.failed_or_missing})"
            )
        return self

    def describe(self) -> str:
        if self.failed_or_missing:
            return "failed or missing"
        if self.keys:
            return "selected"
        return f"from {self.first or 'the first'} to {self.last or 'the last'}"


class ConventionPartitions(BaseModel):
    """A convention's assets and batches as the webserver sees them."""

    convention: str
    asset_keys: list[list[str]]
    # In the order the batches were planned: dynamic partitions keep the order they were added.
    partition_keys: list[str]
    # Batches where at least one asset's latest materialisation failed or never happened, or
    # whose latest run failed (a run can fail after its assets materialised: in a check).
    failed_or_missing: list[str] = []


class RunState(BaseModel):
    """A run as the webserver reports it: enough to tell which batches it covered."""

    run_id: str
    status: str
    created: float
    tags: dict[str, str]

    def partitions(self, in_order: Sequence[str]) -> list[str]:
        """The batches it covered: one, or a range of adjacent ones in planning order."""
        if PARTITION_TAG in self.tags:
            # Another convention's batch when not among these (the asset job is shared).
            return [self.tags[PARTITION_TAG]] if self.tags[PARTITION_TAG] in in_order else []
        first, last = self.tags.get(RANGE_START_TAG), self.tags.get(RANGE_END_TAG)
        if first not in in_order or last not in in_order:
            return []
        return list(in_order[in_order.index(first) : in_order.index(last) + 1])


def batches_whose_last_run_failed(runs: Sequence[RunState], in_order: Sequence[str]) -> set[str]:
    """The batches whose most recent run failed or was canceled."""
    latest: dict[str, RunState] = {}
    for run in sorted(runs, key=lambda r: r.created):
        for partition in run.partitions(in_order):
            latest[partition] = run
    return {key for key, run in latest.items() if run.status in FAILED_RUN_STATUSES}


class BackfillState(BaseModel):
    """Where a backfill is: its status and the status of each of its runs."""

    backfill_id: str
    status: str
    run_statuses: dict[str, str]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def failed_runs(self) -> list[str]:
        return [run for run, status in self.run_statuses.items() if status != "SUCCESS"]

    @property
    def succeeded(self) -> bool:
        """Dagster's own status says success even when every run failed (a run may fail
        after its assets materialised, in a check): every run must have succeeded too."""
        return (
            self.status in SUCCESSFUL_STATUSES and bool(self.run_statuses) and not self.failed_runs
        )

    def progress(self) -> str:
        counts = {"succeeded": 0, "failed": 0, "running or queued": 0}
        for status in self.run_statuses.values():
            if status == "SUCCESS":
                counts["succeeded"] += 1
            elif status in UNFINISHED_RUN_STATUSES:
                counts["running or queued"] += 1
            else:
                counts["failed"] += 1
        runs = ", ".join(f"{n} {what}" for what, n in counts.items())
        return f"backfill {self.backfill_id}: {self.status}; runs: {runs}"


def backfill_title(
    convention: str, partitions: Sequence[str], selection: PartitionSelection
) -> str:
    """A title Dagster accepts (at most 100 characters, no %, * or "), naming the range's
    ends when they fit."""
    short = f"osa backfill {convention}: {len(partitions)} batches"
    if selection.failed_or_missing:
        long = f"{short} (failed or missing)"
    elif selection.keys:
        long = f"{short} (selected)"
    else:
        long = f"{short} ({partitions[0]} to {partitions[-1]})"
    title = long if len(long) <= MAX_TITLE_CHARS else short
    return re.sub(r'[%*"]', "_", title)[:MAX_TITLE_CHARS]


def select_partitions(state: ConventionPartitions, selection: PartitionSelection) -> list[str]:
    """The batches `selection` names, in planning order; unknown keys are an error."""
    known = state.partition_keys
    if selection.failed_or_missing:
        return list(state.failed_or_missing)
    named = selection.keys or [k for k in (selection.first, selection.last) if k is not None]
    unknown = [key for key in named if key not in known]
    if unknown:
        raise BackfillError(
            f"{state.convention} has no partition {', '.join(unknown)} "
            f"({len(known)} planned; the Partitions tab of its assets in the UI lists them)"
        )
    if selection.keys:
        wanted = set(selection.keys)
        return [key for key in known if key in wanted]
    start = known.index(selection.first) if selection.first is not None else 0
    end = known.index(selection.last) if selection.last is not None else len(known) - 1
    if start > end:
        raise BackfillError(
            f"--from {selection.first} comes after --to {selection.last} in the planning "
            f"order of {state.convention}'s partitions"
        )
    return known[start : end + 1]


class DagsterWebserver:
    """The few GraphQL calls a backfill needs, over plain HTTP."""

    def __init__(self, url: str = DEFAULT_WEBSERVER_URL) -> None:
        self.url = url.rstrip("/")

    def _call(self, document: str, variables: dict[str, Any]) -> dict[str, Any]:
        import requests  # here, not above: `osa --help` builds this command's parser

        endpoint = f"{self.url}/graphql"
        try:
            response = requests.post(
                endpoint,
                json={"query": document, "variables": variables},
                timeout=REQUEST_TIMEOUT_S,
            )
        except requests.RequestException as error:
            raise BackfillError(
                f"cannot reach the Dagster webserver at {self.url} ({error}); start it "
                "(`make ui`, `dagster dev` or `dagster-webserver`) or pass --url"
            ) from error
        # The webserver answers a PythonError with status 500 and the error in the body.
        try:
            body = response.json()
        except ValueError:
            raise BackfillError(
                f"{endpoint} answered {response.status_code} without JSON: {response.text[:300]}"
            ) from None
        if body.get("errors"):
            messages = "; ".join(error.get("message", str(error)) for error in body["errors"])
            raise BackfillError(f"{endpoint} rejected the query: {messages}")
        return body["data"]

    def convention_partitions(
        self, convention: str, with_statuses: bool = False
    ) -> ConventionPartitions:
        nodes = self._call(GROUP_ASSETS_QUERY, {})["assetNodes"]
        asset_keys = [
            node["assetKey"]["path"]
            for node in nodes
            if node["groupName"] == convention and node["isPartitioned"]
        ]
        if not asset_keys:
            groups = sorted({node["groupName"] for node in nodes})
            raise BackfillError(
                f"the webserver at {self.url} has no partitioned assets of convention "
                f"{convention!r}; asset groups it knows: {', '.join(groups) or 'none'}"
            )
        variables = {
            "assetKeys": [{"path": key} for key in asset_keys],
            "withStatuses": with_statuses,
        }
        partitioned = self._call(PARTITIONS_QUERY, variables)["assetNodes"]
        # Every asset of a convention shares its batches' partitions definition.
        partition_keys = partitioned[0]["partitionKeysByDimension"][0]["partitionKeys"]
        not_done: set[str] = set()
        for node in partitioned if with_statuses else []:
            statuses = node["assetPartitionStatuses"]
            if statuses["__typename"] != "DefaultPartitionStatuses":
                raise BackfillError(
                    f"asset {'/'.join(node['assetKey']['path'])} reports partition statuses "
                    f"as {statuses['__typename']}, not as the batches of a convention"
                )
            # A batch running right now is neither failed nor missing: leave it to its run.
            running = set(statuses["materializingPartitions"])
            not_done |= (
                set(statuses["failedPartitions"]) | set(statuses["unmaterializedPartitions"])
            ) - running
        if with_statuses:
            not_done |= batches_whose_last_run_failed(
                self.convention_runs(convention), partition_keys
            )
        return ConventionPartitions(
            convention=convention,
            asset_keys=asset_keys,
            partition_keys=partition_keys,
            failed_or_missing=[key for key in partition_keys if key in not_done],
        )

    def convention_runs(self, convention: str) -> list[RunState]:
        """The runs tagged with the convention and those of the implicit asset job."""
        from osa_dagster.defs.jobs import CONVENTION_TAG

        filters = [
            {"tags": [{"key": CONVENTION_TAG, "value": convention}]},
            {"pipelineName": ASSET_JOB_NAME},
        ]
        runs: dict[str, RunState] = {}
        for runs_filter in filters:
            answer = self._call(RUNS_QUERY, {"filter": runs_filter, "limit": RUNS_LOOKED_AT})
            result = answer["runsOrError"]
            if result["__typename"] != "Runs":
                raise BackfillError(
                    f"listing runs: {result['__typename']}: {result.get('message')}"
                )
            for run in result["results"]:
                runs[run["runId"]] = RunState(
                    run_id=run["runId"],
                    status=run["status"],
                    created=run["creationTime"],
                    tags={tag["key"]: tag["value"] for tag in run["tags"]},
                )
        return list(runs.values())

    def launch_asset_backfill(
        self,
        asset_keys: Sequence[Sequence[str]],
        partitions: Sequence[str],
        title: str,
        tags: dict[str, str],
    ) -> str:
        params = {
            "assetSelection": [{"path": list(key)} for key in asset_keys],
            "partitionNames": list(partitions),
            "title": title,
            "tags": [{"key": key, "value": value} for key, value in tags.items()],
        }
        result = self._call(LAUNCH_MUTATION, {"params": params})["launchPartitionBackfill"]
        kind = result["__typename"]
        if kind == "LaunchBackfillSuccess":
            return result["backfillId"]
        raise BackfillError(f"launchPartitionBackfill failed with {kind}: {result.get('message')}")

    def backfill_state(self, backfill_id: str) -> BackfillState:
        result = self._call(STATUS_QUERY, {"backfillId": backfill_id})["partitionBackfillOrError"]
        if result["__typename"] != "PartitionBackfill":
            raise BackfillError(
                f"backfill {backfill_id}: {result['__typename']}: {result.get('message')}"
            )
        return BackfillState(
            backfill_id=backfill_id,
            status=result["status"],
            run_statuses={run["runId"]: run["status"] for run in result["runs"]},
        )

    def backfill_status(self, backfill_id: str) -> str:
        return self.backfill_state(backfill_id).status

    def wait_for_backfill(
        self, backfill_id: str, timeout_s: float, report: Callable[[str], None] = print
    ) -> BackfillState:
        """Poll until the backfill is finished, reporting its progress each time it changes;
        its last state. Needs the daemon running."""
        deadline = time.monotonic() + timeout_s
        reported = ""
        while True:
            state = self.backfill_state(backfill_id)
            if state.progress() != reported:
                reported = state.progress()
                report(reported)
            if state.finished:
                return state
            if time.monotonic() > deadline:
                raise BackfillError(
                    f"backfill {backfill_id} is still {state.status} after {timeout_s:.0f} s; "
                    "is the Dagster daemon running (`dagster dev` or `dagster-daemon run`)?"
                )
            time.sleep(WAIT_POLL_S)

    def backfill_page(self, backfill_id: str) -> str:
        return f"{self.url}/runs/b/{backfill_id}"


def launch_convention_backfill(
    convention: str, selection: PartitionSelection, url: str = DEFAULT_WEBSERVER_URL
) -> tuple[str | None, list[str]]:
    """Launch an asset backfill of every asset of `convention` over the selected batches.

    Returns the backfill id (None when nothing was selected) and the batches it covers.
    """
    from osa_dagster.defs.jobs import CONVENTION_TAG

    webserver = DagsterWebserver(url)
    state = webserver.convention_partitions(convention, with_statuses=selection.failed_or_missing)
    partitions = select_partitions(state, selection)
    if not partitions:
        return None, []
    title = backfill_title(convention, partitions, selection)
    # The convention tag puts these runs under the same per-convention run limits as the
    # ingest job's runs.
    backfill_id = webserver.launch_asset_backfill(
        state.asset_keys, partitions, title, tags={CONVENTION_TAG: convention}
    )
    return backfill_id, partitions


def add_backfill_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """The `backfill` subcommand, for a CLI's subparsers (`osa backfill ...`)."""
    parser = commands.add_parser(
        "backfill",
        help="launch an asset backfill of batches through the Dagster webserver",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
    )
    add_backfill_arguments(parser)
    return parser


def add_backfill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("convention")
    parser.add_argument("keys", nargs="*", metavar="KEY", help="partition keys to backfill")
    parser.add_argument("--from", dest="first", metavar="KEY", help="first key of a range")
    parser.add_argument("--to", dest="last", metavar="KEY", help="last key of a range")
    parser.add_argument(
        "--failed",
        action="store_true",
        help="every batch with an asset whose latest materialisation failed or never ran",
    )
    parser.add_argument(
        "--url",
        help="the Dagster webserver (default: OSA_WEBSERVER_URL, which `osa stack` sets, "
        f"else {DEFAULT_WEBSERVER_URL})",
    )
    parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait this long for the backfill to finish; exit 1 unless it succeeds",
    )


def run_backfill_command(args: argparse.Namespace, configured: Settings) -> int:
    """`osa backfill`: launch, print the backfill's id and page, optionally wait for it."""
    # Found as the instance is: from the environment (DAGSTER_HOME, OSA_WEBSERVER_URL).
    args.url = args.url or configured.webserver_url
    try:
        selection = PartitionSelection(
            keys=args.keys, first=args.first, last=args.last, failed_or_missing=args.failed
        )
    except ValidationError as error:
        problem = error.errors()[0]["msg"].removeprefix("Value error, ")
        print(f"osa backfill: {problem}", file=sys.stderr)
        return 2
    # Checked before the launch: a backfill launched and then not waited for is not what
    # was asked.
    if args.wait is not None and not 0 < args.wait < math.inf:
        print(
            f"osa backfill: --wait: must be a positive number of seconds, not {args.wait:g}",
            file=sys.stderr,
        )
        return 2
    try:
        backfill_id, partitions = launch_convention_backfill(args.convention, selection, args.url)
        if backfill_id is None:
            print(f"nothing to backfill: no {selection.describe()} batches of {args.convention}")
            return 0
        webserver = DagsterWebserver(args.url)
        print(f"launched backfill {backfill_id} of {len(partitions)} {args.convention} batches:")
        print("\n".join(f"  {key}" for key in partitions))
        print(f"follow it at {webserver.backfill_page(backfill_id)}")
        if args.wait is None:
            return 0
        state = webserver.wait_for_backfill(backfill_id, args.wait)
    except BackfillError as error:
        print(f"osa backfill: {error}", file=sys.stderr)
        return 1
    if state.succeeded:
        print(f"backfill {backfill_id} succeeded: all {len(state.run_statuses)} runs succeeded")
        return 0
    print(
        f"backfill {backfill_id} did not succeed ({state.status}): "
        f"{len(state.failed_runs)} of its {len(state.run_statuses)} runs did not succeed"
        + (f": {', '.join(state.failed_runs)}" if state.failed_runs else ""),
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osa_dagster.backfill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backfill_arguments(parser)
    return run_backfill_command(parser.parse_args(argv), Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
