"""The Dagster UI as a curator sees it, in a real (headless) Chromium: the pdb convention's
asset graph, its partitions with their status, the materialisation metadata of a batch
with a rejected record and of one whose hook was OOM-killed and retried with more memory
(then run again, reusing its checkpoints), and each batch's verdict of every check.

Screenshots go to $OSA_TEST_ARTIFACTS (default .test-artifacts/ui/ in the repo)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from osa_dagster.conventions.pdb import EXTRACT_FEATURES
from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import batch_partitions, convention_assets
from osa_dagster.defs.checks import CHECKS
from osa_dagster.defs.resources import asset_kinds
from osa_dagster.settings import Settings
from tests.test_pdb_end_to_end import MIRROR, expected_publishable
from tests.ui.conftest import (
    CODE_LOCATION,
    artifacts_dir,
    chromium_path,
    dagster_server,
    make_site,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.slow

BATCH_SIZE = 10
# Of the bundled mirror, in id order: the 2nd batch holds the damaged 1OSM (rejected), the
# 5th starts with the ribosome 6ZU5, which extract_features only passes at its second rung.
REJECTING_BATCH, OOM_BATCH = 1, 4
REJECTED_RECORD, OOM_RECORD = "1OSM", "6ZU5"
UI_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1600, "height": 1000}
CHROMIUM_ARGS = [
    "--no-sandbox",  # Chromium refuses to start as root with its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class IngestedSite:
    url: str
    partitions: list[str]
    materialised: list[str]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestedSite]:
    """The bundled mirror planned in batches of 10, two of them ingested, the OOM batch a
    second time (its hooks' checkpoints are finished, so nothing runs again), and the
    webserver."""
    site = make_site(tmp_path_factory.mktemp("browser"))
    partitions = site.plan("pdb", "--batch-size", str(BATCH_SIZE))
    materialised = [partitions[REJECTING_BATCH], partitions[OOM_BATCH]]
    site.osa("materialize", "pdb", *materialised)
    site.osa("materialize", "pdb", partitions[OOM_BATCH])
    command = [sys.executable, "-m", "dagster_webserver"]
    with dagster_server(site, command, "dagster-webserver") as url:
        yield IngestedSite(url=url, partitions=partitions, materialised=materialised)


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


# chromium first: without a browser, skip (or fail) before ingesting anything.
@pytest.fixture(scope="module")
def page(chromium: str, ingested: IngestedSite) -> Iterator[Page]:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (no browser download)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport=VIEWPORT, base_url=ingested.url)
        page.set_default_timeout(UI_TIMEOUT_MS)
        # Assertions wait as long as actions do: a loaded machine renders the graph slowly.
        expect.set_options(timeout=UI_TIMEOUT_MS)
        yield page
        browser.close()


@contextmanager
def screenshot_after(page: Page, name: str) -> Iterator[None]:
    """Save what the page shows once the block is done, also when an assertion failed."""
    try:
        yield
    finally:
        page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)


def metadata_value(page: Page, label: str) -> Locator:
    """The value cell of the materialisation's metadata entry `label`."""
    label_cell = page.get_by_role("cell", name=label, exact=True)
    return page.get_by_role("row").filter(has=label_cell).get_by_role("cell").nth(1)


def batch_asset_names() -> list[str]:
    """What the graph labels the pdb convention's batch assets with: the last part of the key."""
    convention = load_conventions(Settings.from_env())["pdb"]
    kinds = asset_kinds(Settings.from_env())
    assets = list(convention_assets(convention, batch_partitions(convention), kinds).assets or [])
    return [key.path[-1] for asset in assets for key in asset.keys]


def test_asset_graph_of_the_convention(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    with screenshot_after(page, "01_pdb_asset_graph"):
        page.goto(f"/locations/{CODE_LOCATION}/asset-groups/pdb")
        names = batch_asset_names()
        assert {"raw_batch", "published_records", "features"} <= set(names)
        for name in names:
            expect(page.get_by_text(name, exact=True)).to_be_visible()
        share = 100 * len(ingested.materialised) // len(ingested.partitions)
        # Every asset of the graph shows how many of its partitions are materialised.
        expect(page.get_by_text(f"{share}% filled")).to_have_count(len(names))
        expect(page.get_by_text(f"{len(ingested.partitions)} partitions")).to_have_count(len(names))


def test_partitions_of_published_records_with_their_status(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    with screenshot_after(page, "02_published_records_partitions"):
        page.goto("/assets/pdb/published_records?view=partitions")
        done, missing = len(ingested.materialised), len(ingested.partitions) - 2
        expect(page.get_by_text(f"Materialized ({done})")).to_be_visible()
        expect(page.get_by_text(f"Missing ({missing})")).to_be_visible()
        expect(page.get_by_text("Failed (0)")).to_be_visible()
        for key in ingested.partitions:
            expect(page.get_by_text(key, exact=True).first).to_be_visible()


def test_a_batch_with_a_rejected_record(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    partition = ingested.partitions[REJECTING_BATCH]
    batch = mirror_entries(MIRROR)[REJECTING_BATCH * BATCH_SIZE :][:BATCH_SIZE]
    passing = sum(1 for _, path in batch if expected_publishable(path))
    assert passing == len(batch) - 1  # only the damaged entry fails, as SOURCES.md says
    with screenshot_after(page, "03_published_records_rejected_record"):
        page.goto(f"/assets/pdb/published_records?view=partitions&partition={partition}")
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        expect(metadata_value(page, "records_in")).to_have_text(str(len(batch)))
        expect(metadata_value(page, "published")).to_have_text(str(passing))
        expect(metadata_value(page, "not_published")).to_have_text("1")
        rejected = metadata_value(page, "not_published_records")
        expect(rejected).to_contain_text(REJECTED_RECORD)
        expect(rejected).to_contain_text("validate_structure")
        expect(rejected).to_contain_text("rejected: 1osm.cif.gz cannot be read as mmCIF")
        expect(metadata_value(page, "srns")).to_contain_text("urn:osa:")


def test_a_batch_whose_hook_was_oom_killed(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    partition = ingested.partitions[OOM_BATCH]
    first_rung, second_rung = EXTRACT_FEATURES.memory.ladder()[:2]
    with screenshot_after(page, "04_extract_features_oom_attempts"):
        page.goto(
            f"/assets/pdb/hook_outcomes/extract_features?view=partitions&partition={partition}"
        )
        expect(metadata_value(page, "oom_attempts")).to_have_text("1")
        expect(metadata_value(page, "memory_limits_mb")).to_have_text(
            f"{first_rung} -> {second_rung}"
        )
        attempts = metadata_value(page, "attempt_log")
        expect(attempts).to_contain_text("OOM killed")
        expect(attempts).to_contain_text(OOM_RECORD)
        expect(attempts).to_contain_text("exit 0")
        # The latest materialisation is the second run's, which reused both attempts: the log
        # says so, and counts no OOM of its own.
        expect(metadata_value(page, "oom_attempts_this_run")).to_have_text("0")
        expect(metadata_value(page, "attempts_reused")).to_have_text("2")
        expect(attempts.get_by_text("reused: earlier run")).to_have_count(2)
        expect(attempts).not_to_contain_text("this run")
        # The memory history names the record each OOM was charged to, this batch's apart.
        expect(metadata_value(page, "memory_history_this_batch")).to_contain_text(OOM_RECORD)
        expect(metadata_value(page, "memory_history_all_batches")).to_contain_text("OOM-killed")


def open_check_tab(page: Page, check: str, tab: str) -> None:
    """The check's page under published_records or features, on its own tab `tab`."""
    asset = "features" if check == "published_records_have_features" else "published_records"
    page.goto(f"/assets/pdb/{asset}?view=checks&checkDetail={check}")
    page.get_by_role("tablist").filter(has_text="Execution history").get_by_text(
        tab, exact=True
    ).click()


# What the checks' Partitions tabs show: the invariants pass on both ingested batches, and
# each flag warns on the batch it is about.
FLAGGED = {"every_record_passed": REJECTING_BATCH, "no_oom_kills": OOM_BATCH}


def test_each_batch_has_its_own_verdict_of_every_check(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    missing = len(ingested.partitions) - len(ingested.materialised)
    for spec in CHECKS:
        with screenshot_after(page, f"05_check_partitions_{spec.name}"):
            open_check_tab(page, spec.name, "Partitions")
            failed = 1 if spec.name in FLAGGED else 0
            for status, count in [
                ("Passed", len(ingested.materialised) - failed),
                ("Failed", failed),
                ("Missing", missing),
                ("Skipped", 0),
                ("Execution Failed", 0),
            ]:
                expect(page.get_by_text(f"{status} ({count})", exact=True)).to_be_visible()


def test_a_flagged_batch_says_why(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    with screenshot_after(page, "06_no_oom_kills_of_the_re_run_batch"):
        open_check_tab(page, "no_oom_kills", "Partitions")
        page.get_by_text(ingested.partitions[OOM_BATCH], exact=True).first.click()
        expect(page.get_by_text("Failed", exact=True).last).to_be_visible()
        expect(page.get_by_text(f"on {OOM_RECORD} (reused: earlier run")).to_be_visible()
    with screenshot_after(page, "07_every_record_passed_of_the_rejecting_batch"):
        open_check_tab(page, "every_record_passed", "Partitions")
        page.get_by_text(ingested.partitions[REJECTING_BATCH], exact=True).first.click()
        expect(page.get_by_text(f"{REJECTED_RECORD} (validate_structure: rejected")).to_be_visible()


def test_every_execution_of_a_check_names_its_batch(page, ingested: IngestedSite):
    from playwright.sync_api import expect

    with screenshot_after(page, "08_counts_add_up_execution_history"):
        open_check_tab(page, "counts_add_up", "Execution history")
        rejecting, oom = ingested.partitions[REJECTING_BATCH], ingested.partitions[OOM_BATCH]
        # Three runs: one of each batch, then the OOM batch again; nothing without a batch.
        expect(page.get_by_role("row").filter(has_text="Passed")).to_have_count(3)
        expect(page.get_by_role("row").filter(has_text=oom)).to_have_count(2)
        expect(page.get_by_role("row").filter(has_text=rejecting)).to_have_count(1)
        expect(page.get_by_text("Skipped")).to_have_count(0)
