"""A convention: what one upstream database brings into the archive.

A convention bundles an ingester (discover + fetch), the hooks every record must pass,
and the shape of its record metadata. The project ships some; users add their own in
modules named by OSA_CONVENTIONS (see registry.py), without editing the project.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from osa_sdk.authoring import Ingester
from pydantic import BaseModel, ConfigDict, Field, model_validator

from osa_dagster.engine.spec import HookSpec

DEFAULT_BATCH_SIZE = 100

LocationKind = Literal["path", "url"]
"""What a source's location is: a local folder or file, or the base URL of a service."""


class HookImage(BaseModel):
    """The container image a convention's hooks run in under the Docker or Kubernetes runner.

    `images/build.py` builds it on a Debian base from wheels made on the host: osa-sdk, this
    project (for the hook modules), and `requirements`, pinned to the host's versions.
    """

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9._-]+$")
    requirements: tuple[str, ...] = ()


class IngesterSource(BaseModel):
    """Another place a convention's records can come from: an upstream API beside a local
    mirror, say. The records (and their source ids) and the hooks are the same, so a record
    keeps its SRN whichever source brought it in."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ingester: str
    """"package.module:Class", imported only when chosen: hook images, which import the
    convention for its hooks, need not carry an upstream API's client libraries."""
    config: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    location_parameter: str | None = None
    """The ingester's keyword argument that a location chosen without code sets (in
    OSA_SOURCES or the plan job's run config), if the source takes one."""
    location_kind: LocationKind = "path"

    def load(self) -> type[Ingester]:
        module_name, _, class_name = self.ingester.partition(":")
        found = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(found, type) and issubclass(found, Ingester)):
            raise ValueError(f"{self.ingester} is not an Ingester class")
        return found


class Convention(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    ingester: type[Ingester]
    ingester_config: dict[str, Any] = Field(default_factory=dict)
    hooks: tuple[HookSpec, ...] = Field(min_length=1)
    record_schema: type[BaseModel] | None = None
    """Validates each record's metadata in raw_batch when set."""
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, gt=0)
    """Records per partition (frozen batch): sized for the database (see the README)."""
    shard_size: int | None = Field(default=None, gt=0)
    """The most records one hook's chain of attempts (memory ladder, attempt log, checkpoint)
    takes of a batch: a larger batch is split into shards, run as separate jobs
    (batch/shards.py). None: no limit; a batch is still split to fill idle slots."""
    hook_image: HookImage | None = None
    source: str = "local"
    """The name of the source `ingester` reads; OSA_SOURCES picks one of `sources` instead."""
    location_parameter: str | None = None
    """The keyword argument of `ingester` that takes a local folder or file, if any."""
    location: str | None = None
    """The location chosen for the source (absolute path or URL); None: its default."""
    sources: dict[str, IngesterSource] = Field(default_factory=dict)
    """The sources other than the one read now, by name."""

    @model_validator(mode="after")
    def _hook_names_unique(self) -> Convention:
        names = [h.name for h in self.hooks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"convention {self.name!r}: hook names repeat: {duplicates}")
        return self

    def hook(self, name: str) -> HookSpec:
        for spec in self.hooks:
            if spec.name == name:
                return spec
        raise KeyError(f"convention {self.name!r} has no hook {name!r}")

    def _all_sources(self) -> dict[str, IngesterSource]:
        """Every source by name, the one read now included (with its own configuration)."""
        current = IngesterSource(
            ingester=f"{self.ingester.__module__}:{self.ingester.__qualname__}",
            config={k: v for k, v in self.ingester_config.items() if k != self.location_parameter},
            location_parameter=self.location_parameter,
        )
        return {**self.sources, self.source: current}

    def choose_source(self, setting: str) -> Convention:
        """This convention reading from `setting`: a source's name ("rcsb"), a location (a
        folder or file for the local source, a URL for the source that takes one), or both
        as NAME:LOCATION. A ValueError says in one line what is wrong with it."""
        sources = self._all_sources()
        setting = setting.strip()
        name, sep, location = setting.partition(":")
        if setting in sources:
            return self.with_source(setting)
        if sep and name in sources:
            return self.with_source(name, location)
        kind: LocationKind = "url" if "://" in setting else "path"
        takers = [n for n, s in sources.items() if s.location_parameter and s.location_kind == kind]
        if kind == "path" and not Path(setting).expanduser().exists():
            problem = "nor a folder or file that exists"
        elif not takers:
            problem = f"and none of them reads {'a URL' if kind == 'url' else 'a folder or file'}"
        else:
            return self.with_source(takers[0], setting)
        raise ValueError(
            f"{self.name}: {setting!r} is not one of its sources {sorted(sources)}, {problem}"
        )

    def with_source(self, name: str, location: str | None = None) -> Convention:
        """This convention reading its records from source `name`, at `location` if given."""
        sources = self._all_sources()
        if name not in sources:
            raise ValueError(
                f"convention {self.name!r} has no source {name!r}: one of {sorted(sources)}"
            )
        if name == self.source and location == self.location:
            return self
        chosen = sources[name]
        config = dict(chosen.config)
        if location is not None:
            location = _checked_location(self.name, name, chosen, location)
            config[chosen.location_parameter or ""] = location
        ingester = chosen.load()
        try:
            ingester(**config)
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.name} source {name}: {error}") from error
        return self.model_copy(
            update={
                "ingester": ingester,
                "ingester_config": config,
                "source": name,
                "location": location,
                "location_parameter": chosen.location_parameter,
                "sources": {n: s for n, s in sources.items() if n != name},
            }
        )

    def make_ingester(self) -> Ingester:
        return self.ingester(**self.ingester_config)


def _checked_location(convention: str, name: str, source: IngesterSource, location: str) -> str:
    """`location` as the source takes it: a URL with a scheme and host, or an absolute path
    (a relative one is resolved here, so that the frozen batches name it wherever they run)."""
    if source.location_parameter is None:
        raise ValueError(f"{convention} source {name} takes no location, so not {location!r}")
    if source.location_kind == "url":
        parts = urlsplit(location)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{convention} source {name}: {location!r} is not an http(s) URL")
        return location
    if not location:
        raise ValueError(f"{convention} source {name}: the location is empty")
    return str(Path(location).expanduser().absolute())
