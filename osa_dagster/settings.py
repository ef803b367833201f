"""Every OSA_* variable of the project, typed and validated in one place.

`Settings.from_env()` reads the environment once; a malformed value raises `SettingsError`,
whose one-line message names the variable, what it holds and what it must be. The CLI, the
Dagster resources and the batch steps read their settings from here, so a variable means
the same thing and fails the same way wherever it is used.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_DATA_DIR = Path(".data")
DEFAULT_DEPOSIT_MAX_MB = 2048.0
PLAN_CRON_PREFIX = "OSA_PLAN_CRON_"
# OSA_DOMAIN is the <domain> of SRNs, urn:osa:<domain>:rec:<uuid>: a DNS name, whose
# letters, digits, hyphens and dots are all a URN may hold there without escaping.
DNS_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# botocore's own bucket-name check: looser than today's S3 rules so legacy buckets pass.
BUCKET_NAME = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

RunnerKind = Literal["local", "docker", "kubernetes"]
MemoryLimits = Literal["cgroup", "rlimit", "off"]


class SettingsError(ValueError):
    """An OSA_* variable that cannot be used; the message names it."""


class MemoryOverride(BaseModel):
    """A hook's memory ladder set by OSA_HOOK_MEMORY: base MB and, optionally, cap MB."""

    model_config = ConfigDict(frozen=True)

    base_mb: int = Field(gt=0)
    cap_mb: int | None = Field(default=None, gt=0)


class Settings(BaseModel):
    """The project's settings; each field's `alias` is its variable."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    data_dir: Path = Field(DEFAULT_DATA_DIR, alias="OSA_DATA_DIR")
    """Folder of the default artifact store and records database, and of the embedded
    Dagster instance; unset: .data in DAGSTER_HOME, else in the working folder (data_dir)."""
    storage: str = Field("", alias="OSA_STORAGE")
    """Artifact store: a folder or s3://bucket/prefix; empty: <data_dir>/artifacts."""
    s3_endpoint_url: str | None = Field(None, alias="OSA_S3_ENDPOINT_URL")
    s3_retry_attempts: int = Field(8, ge=1, alias="OSA_S3_RETRY_ATTEMPTS")
    s3_retry_max_wait_s: float = Field(
        8.0, gt=0, allow_inf_nan=False, alias="OSA_S3_RETRY_MAX_WAIT_S"
    )
    database_url: str | None = Field(None, alias="OSA_DATABASE_URL")
    """Records database, any SQLAlchemy URL; None: SQLite in the data folder."""
    database_password: str | None = Field(None, repr=False, alias="OSA_DATABASE_PASSWORD")
    """The records database's password, kept out of OSA_DATABASE_URL so that the URL can be
    shown (in the UI's resources, in messages) without it."""
    domain: str = Field("localhost", min_length=1, alias="OSA_DOMAIN")
    """This archive's name in SRNs: a DNS name (see DNS_NAME)."""
    conventions: tuple[str, ...] = Field((), alias="OSA_CONVENTIONS")
    hook_memory: dict[str, MemoryOverride] = Field(default_factory=dict, alias="OSA_HOOK_MEMORY")
    """"convention.hook" -> its ladder's base and cap."""
    sources: dict[str, str] = Field(default_factory=dict, alias="OSA_SOURCES")
    partitions_per_run: int = Field(20, ge=1, alias="OSA_PARTITIONS_PER_RUN")
    runs_at_once: int = Field(1, ge=1, alias="OSA_RUNS_AT_ONCE")
    """Runs `osa materialize` keeps going at once, each in a worker process of its own, with
    the partitions shared among them: while one run's hooks take the slots, another's fetch,
    publish and features steps use the cores they leave. 1: one run after another, in the
    command's own process."""
    deposits: str = Field("", alias="OSA_DEPOSITS")
    """Where records are deposited for validation; empty: <data_dir>/deposits."""
    deposit_max_mb: float = Field(
        DEFAULT_DEPOSIT_MAX_MB, gt=0, allow_inf_nan=False, alias="OSA_DEPOSIT_MAX_MB"
    )
    """MB that one deposit's files may add up to, by their apparent sizes (a sparse file
    counts in full); each file is also held to its convention's max_file_mb."""
    executor: Literal["in_process", "multiprocess", "docker"] = Field(
        "in_process", alias="OSA_EXECUTOR"
    )
    hook_runner: RunnerKind = Field("local", alias="OSA_HOOK_RUNNER")
    hook_sandbox: Literal["on", "off"] = Field("on", alias="OSA_HOOK_SANDBOX")
    """Local hooks sandboxed (on: else refuse to run them), or off: unsandboxed, trusted."""
    hook_sandbox_user: str = Field(
        "65534:65534", pattern=r"^[1-9][0-9]*:[0-9]+$", alias="OSA_HOOK_SANDBOX_USER"
    )
    """uid:gid that sandboxed hooks run as: numeric, never root."""
    hook_memory_limits: MemoryLimits = Field("cgroup", alias="OSA_HOOK_MEMORY_LIMITS")
    """How local hooks' memory is limited: "cgroup" (a real limit, or refuse to run), or the
    opt-outs "rlimit" (RLIMIT_AS, approximate) and "off" (none)."""
    cgroup_parent: Path | None = Field(None, alias="OSA_CGROUP_PARENT")
    """cgroup v2: the cgroup (a folder under /sys/fs/cgroup, empty of processes) to make
    attempts' cgroups in; None: the orchestrator's own cgroup, delegated to it."""
    hook_slots: int | None = Field(None, ge=1, alias="OSA_HOOK_SLOTS")
    """Hook attempts running at once on this machine; None: the CPUs this process may use."""
    hook_memory_budget_mb: int | None = Field(None, ge=1, alias="OSA_HOOK_MEMORY_BUDGET")
    """MB that the memory limits of every hook attempt running on this machine may add up
    to; None: 80 % of the memory of the orchestrator's cgroup, or of the host."""
    hook_ledger: Path | None = Field(None, alias="OSA_HOOK_LEDGER")
    """The ledger of the slots and budget (engine/capacity.py), shared by every process
    that names the same file; None: hook-capacity.json in the data folder."""
    step_image: str | None = Field(None, alias="OSA_STEP_IMAGE")
    k8s_namespace: str = Field("default", min_length=1, alias="OSA_K8S_NAMESPACE")
    k8s_staging_secret: str | None = Field(None, alias="OSA_K8S_STAGING_SECRET")
    k8s_s3_endpoint_url: str | None = Field(None, alias="OSA_K8S_S3_ENDPOINT_URL")
    plan_cron: dict[str, str] = Field(default_factory=dict)
    """Convention -> cron of its weekly plan, from OSA_PLAN_CRON_<CONVENTION>."""
    compute_log_bucket: str | None = Field(None, alias="OSA_COMPUTE_LOG_BUCKET")
    """The bucket of the production profile's compute logs (required by that profile)."""
    compute_log_prefix: str = Field("compute-logs", min_length=1, alias="OSA_COMPUTE_LOG_PREFIX")
    compute_log_access_key_id: str | None = Field(
        None, repr=False, alias="OSA_COMPUTE_LOG_ACCESS_KEY_ID"
    )
    """With OSA_COMPUTE_LOG_SECRET_ACCESS_KEY, the compute logs' own S3 credentials; unset,
    boto3's default chain (AWS_ACCESS_KEY_ID..., a profile, an instance role)."""
    compute_log_secret_access_key: str | None = Field(
        None, repr=False, alias="OSA_COMPUTE_LOG_SECRET_ACCESS_KEY"
    )
    webserver_url: str = Field("http://127.0.0.1:3000", alias="OSA_WEBSERVER_URL")
    """The Dagster webserver that `osa backfill` talks to."""
    watch_interval_s: int = Field(3600, ge=1, alias="OSA_WATCH_INTERVAL_S")
    watch_overlap_h: float = Field(48.0, ge=0, allow_inf_nan=False, alias="OSA_WATCH_OVERLAP_H")
    lease_wait_s: float = Field(1800.0, ge=0, allow_inf_nan=False, alias="OSA_LEASE_WAIT_S")
    """How long a step waits for a batch that another live run works (batch/lease.py)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings of `environ` (default: this process's); blank variables are unset."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(field.alias or "", "").strip() if field.alias else ""
            if raw:
                values[name] = _PARSERS.get(name, _as_is)(raw, field.alias or name)
        values["plan_cron"] = {
            key.removeprefix(PLAN_CRON_PREFIX).lower(): _cron(value.strip(), key)
            for key, value in env.items()
            if key.startswith(PLAN_CRON_PREFIX) and value.strip()
        }
        try:
            settings = cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            field_name = str(first["loc"][0]) if first["loc"] else ""
            failed = cls.model_fields.get(field_name)
            variable = failed.alias if failed and failed.alias else field_name
            shown = env.get(variable, "")
            raise SettingsError(f"{variable}={shown!r}: {first['msg']}") from None
        return settings.model_copy(update={"data_dir": data_dir(env)})

    @property
    def artifacts_location(self) -> str:
        """OSA_STORAGE, or the default folder in the data folder."""
        return self.storage or str(self.data_dir / "artifacts")

    @property
    def hook_ledger_path(self) -> Path:
        return self.hook_ledger or self.data_dir / "hook-capacity.json"

    @property
    def deposits_location(self) -> str:
        return self.deposits or str(self.data_dir / "deposits")

    @property
    def local_data_folders(self) -> tuple[Path, ...]:
        """Every folder of this machine that holds the archive's data: the data folder, and
        the artifact store, the deposits and a SQLite records database wherever they are set
        to be. A sandboxed hook sees none of them."""
        folders = [self.data_dir]
        for location in (self.artifacts_location, self.deposits_location):
            if not location.startswith("s3://"):
                folders.append(Path(location).resolve())
        if self.database_url and self.database_url.startswith("sqlite:///"):
            database = self.database_url.removeprefix("sqlite:///").partition("?")[0]
            folders.append(Path(database).resolve().parent)
        return tuple(dict.fromkeys(folders))

    @property
    def hook_sandbox_ids(self) -> tuple[int, int]:
        uid, _, gid = self.hook_sandbox_user.partition(":")
        return int(uid), int(gid)

    def memory_override(self, convention: str, hook: str) -> MemoryOverride | None:
        return self.hook_memory.get(f"{convention}.{hook}")


def settings() -> Settings:
    """The settings of this process's environment, read now (tests change it freely)."""
    return Settings.from_env()


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The project's data folder: OSA_DATA_DIR; else .data in DAGSTER_HOME, so that the
    records and the instance it holds stay together whatever folder a command starts in;
    else .data in the working directory. Read alone, so that a command that needs only the
    data folder works whatever else is set."""
    env = os.environ if environ is None else environ
    home = env.get("DAGSTER_HOME", "").strip()
    default = Path(home) / DEFAULT_DATA_DIR if home else DEFAULT_DATA_DIR
    return Path(env.get("OSA_DATA_DIR", "").strip() or default).resolve()


def _as_is(raw: str, _variable: str) -> str:
    return raw


def _comma_list(raw: str, _variable: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _pairs(raw: str, variable: str, shape: str) -> dict[str, str]:
    pairs = {}
    for item in _comma_list(raw, variable):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise SettingsError(f"{variable}: entry {item!r} is not {shape}")
        pairs[key] = value
    return pairs


def _sources(raw: str, variable: str) -> dict[str, str]:
    return _pairs(raw, variable, "CONVENTION=SOURCE")


def _hook_memory(raw: str, variable: str) -> dict[str, MemoryOverride]:
    overrides = {}
    shape = "CONVENTION.HOOK=BASE_MB[:CAP_MB]"
    for hook, ladder in _pairs(raw, variable, shape).items():
        base, _, cap = ladder.partition(":")
        if "." not in hook or not base.strip().isdigit() or (cap and not cap.strip().isdigit()):
            raise SettingsError(f"{variable}: entry {hook}={ladder!r} is not {shape}")
        try:
            override = MemoryOverride(base_mb=int(base), cap_mb=int(cap) if cap else None)
        except ValidationError:
            raise SettingsError(
                f"{variable}: entry {hook}={ladder!r}: memory must be a positive number of MB"
            ) from None
        if override.cap_mb is not None and override.cap_mb < override.base_mb:
            raise SettingsError(
                f"{variable}: entry {hook}={ladder!r}: the cap ({override.cap_mb} MB) is below "
                f"the base ({override.base_mb} MB)"
            )
        overrides[hook] = override
    return overrides


def _store_location(raw: str, variable: str) -> str:
    """A folder, file://FOLDER or s3://BUCKET[/PREFIX]: any other URL would be taken for a
    relative folder of that name."""
    scheme = URL_SCHEME.match(raw)
    shape = "a folder, file://FOLDER or s3://BUCKET[/PREFIX]"
    if scheme is None or scheme.group(1).lower() == "file":
        return raw
    authority = raw[scheme.end() :].partition("/")[0]
    if "@" in authority:  # never echo credentials someone put into the URL
        raise SettingsError(f"{variable}: a store's location holds no credentials; use {shape}")
    if scheme.group(1).lower() != "s3":
        raise SettingsError(f"{variable}={raw!r}: {scheme.group(0)} is not a store; use {shape}")
    if not BUCKET_NAME.match(authority):
        raise SettingsError(
            f"{variable}={raw!r}: it must name a bucket (letters, digits, '.', '-', '_')"
        )
    return raw


def _dns_name(raw: str, variable: str) -> str:
    if not DNS_NAME.match(raw):
        raise SettingsError(
            f"{variable}={raw!r}: it goes into SRNs (urn:osa:<domain>:rec:<uuid>) and must "
            "be a DNS name: letters, digits and '-', in labels joined by '.'"
        )
    return raw


def _cron(raw: str, variable: str) -> str:
    # croniter is what Dagster's schedules evaluate cron strings with; Dagster takes only
    # its five-field ones (no seconds).
    from croniter import croniter

    if len(raw.split()) != 5 or not croniter.is_valid(raw):
        raise SettingsError(
            f"{variable}={raw!r}: not a cron schedule of five fields "
            "(minute hour day month weekday, e.g. '0 3 * * 1')"
        )
    return raw


def _ledger_file(raw: str, variable: str) -> Path:
    """A file that the ledger can be written to and replaced in: a regular file or none yet,
    in a folder (made on first use) that takes new files. Only trying proves the last:
    root may write anywhere by the permissions, yet not create a file in /proc."""
    path = Path(raw).expanduser().absolute()
    if path.exists() and not path.is_file():
        raise SettingsError(f"{variable}={raw!r}: it exists and is not a regular file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SettingsError(f"{variable}={raw!r}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SettingsError(
            f"{variable}={raw!r}: the ledger's folder {folder} takes no new file ({error.strerror})"
        ) from None
    return path


_PARSERS = {
    "conventions": _comma_list,
    "sources": _sources,
    "hook_memory": _hook_memory,
    "storage": _store_location,
    "deposits": _store_location,
    "domain": _dns_name,
    "hook_ledger": _ledger_file,
}
