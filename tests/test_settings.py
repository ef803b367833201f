"""Every OSA_* variable is read in one place, and a bad one fails in one line naming it."""

from pathlib import Path

import pytest

from osa_dagster.settings import MemoryOverride, Settings, SettingsError


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path(".data").resolve()
    assert settings.artifacts_location == str(Path(".data").resolve() / "artifacts")
    assert (settings.partitions_per_run, settings.hook_runner, settings.executor) == (
        20,
        "local",
        "in_process",
    )


def test_values_are_parsed_into_their_types() -> None:
    settings = Settings.from_env(
        {
            "OSA_DATA_DIR": "/srv/osa",
            "OSA_PARTITIONS_PER_RUN": " 5 ",
            "OSA_CONVENTIONS": "lab.one, lab.two,,",
            "OSA_HOOK_MEMORY": "pdb.extract_features=2048:16384,geo.validate_soft=512",
            "OSA_SOURCES": "pdb=rcsb,geo=ncbi",
            "OSA_PLAN_CRON_PDB": "0 4 * * 2",
            "OSA_WATCH_OVERLAP_H": "12.5",
            "OSA_HOOK_SLOTS": "6",
            "OSA_HOOK_MEMORY_BUDGET": "16000",
        }
    )
    assert settings.data_dir == Path("/srv/osa")
    assert settings.partitions_per_run == 5
    assert settings.conventions == ("lab.one", "lab.two")
    assert settings.memory_override("pdb", "extract_features") == MemoryOverride(
        base_mb=2048, cap_mb=16384
    )
    assert settings.memory_override("geo", "validate_soft") == MemoryOverride(base_mb=512)
    assert settings.sources == {"pdb": "rcsb", "geo": "ncbi"}
    assert settings.plan_cron == {"pdb": "0 4 * * 2"}
    assert settings.watch_overlap_h == 12.5
    assert (settings.hook_slots, settings.hook_memory_budget_mb) == (6, 16000)
    assert settings.hook_ledger_path == Path("/srv/osa/hook-capacity.json")


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("OSA_PARTITIONS_PER_RUN", "abc", "valid integer"),
        ("OSA_PARTITIONS_PER_RUN", "0", "greater than or equal to 1"),
        ("OSA_HOOK_RUNNER", "podman", "'local', 'docker' or 'kubernetes'"),
        ("OSA_EXECUTOR", "threads", "'in_process', 'multiprocess' or 'docker'"),
        ("OSA_HOOK_MEMORY", "pdb.extract_features=lots", "CONVENTION.HOOK=BASE_MB[:CAP_MB]"),
        ("OSA_HOOK_MEMORY", "extract_features=256", "CONVENTION.HOOK=BASE_MB[:CAP_MB]"),
        ("OSA_HOOK_MEMORY", "pdb.extract_features=4096:1024", "below the base"),
        ("OSA_SOURCES", "pdb", "CONVENTION=SOURCE"),
        ("OSA_S3_RETRY_MAX_WAIT_S", "nan", "finite number"),
        ("OSA_WATCH_INTERVAL_S", "hourly", "valid integer"),
        ("OSA_HOOK_SLOTS", "0", "greater than or equal to 1"),
        ("OSA_HOOK_MEMORY_BUDGET", "8g", "valid integer"),
        ("OSA_STORAGE", "ftp://x/y", "ftp:// is not a store"),
        ("OSA_STORAGE", "s3://", "it must name a bucket"),
        ("OSA_STORAGE", "s3://bad bucket/prefix", "it must name a bucket"),
        ("OSA_DEPOSITS", "http://example.org/deposits", "http:// is not a store"),
        ("OSA_DEPOSITS", "ftp://user:secret@host/x", "holds no credentials; use a folder"),
        ("OSA_DOMAIN", "bad domain:/x", "must be a DNS name"),
        ("OSA_DOMAIN", "osa:archive", "must be a DNS name"),
        ("OSA_DOMAIN", "-osa.example.org", "must be a DNS name"),
        ("OSA_DOMAIN", "a" * 64 + ".org", "must be a DNS name"),
        ("OSA_PLAN_CRON_PDB", "not a cron", "not a cron schedule of five fields"),
        ("OSA_PLAN_CRON_PDB", "0 3 * * 9", "not a cron schedule of five fields"),
        # Six fields (seconds first) croniter takes, Dagster's schedules do not.
        ("OSA_PLAN_CRON_PDB", "0 0 3 * * 1", "not a cron schedule of five fields"),
        ("OSA_HOOK_LEDGER", "/proc/version", "takes no new file"),
        ("OSA_HOOK_LEDGER", "/dev/null", "exists and is not a regular file"),
        ("OSA_HOOK_LEDGER", "/etc/hostname/ledger.json", "is not a folder"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_variable(
    variable: str, value: str, problem: str
) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env({variable: value})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(variable)
    assert problem in message


def test_good_locations_names_and_schedules_pass(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "OSA_STORAGE": "s3://osa-artifacts/osa",
            "OSA_DEPOSITS": f"file://{tmp_path}/deposits",
            "OSA_DOMAIN": "archive.osa-example.org",
            "OSA_PLAN_CRON_GEO": "*/15 2-4 1,15 * mon-fri",
            "OSA_HOOK_LEDGER": str(tmp_path / "not" / "yet" / "ledger.json"),
        }
    )
    assert settings.domain == "archive.osa-example.org"
    assert settings.plan_cron == {"geo": "*/15 2-4 1,15 * mon-fri"}
    assert settings.hook_ledger_path == tmp_path / "not" / "yet" / "ledger.json"
    # Checking the ledger's folder made nothing: the ledger makes its folders on first use.
    assert list(tmp_path.iterdir()) == []
