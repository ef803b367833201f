"""A convention: what one upstream database brings into the archive.

A convention bundles an ingester (discover + fetch), the hooks every record must pass,
and the shape of its record metadata. The project ships some; users add their own in
modules named by OSA_CONVENTIONS (see registry.py), without editing the project.
"""

from __future__ import annotations

import importlib
from typing import Any

from osa_sdk.authoring import Ingester
from pydantic import BaseModel, ConfigDict, Field, model_validator

from osa_dagster.engine.spec import HookSpec

DEFAULT_BATCH_SIZE = 100


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
    hook_image: HookImage | None = None
    source: str = "local"
    """The name of the source `ingester` reads; OSA_SOURCES picks one of `sources` instead."""
    sources: dict[str, IngesterSource] = Field(default_factory=dict)

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

    def with_source(self, name: str) -> Convention:
        """This convention reading its records from source `name`."""
        if name == self.source:
            return self
        if name not in self.sources:
            choices = sorted([self.source, *self.sources])
            raise ValueError(f"convention {self.name!r} has no source {name!r}: one of {choices}")
        chosen = self.sources[name]
        return self.model_copy(
            update={"ingester": chosen.load(), "ingester_config": chosen.config, "source": name}
        )

    def make_ingester(self) -> Ingester:
        return self.ingester(**self.ingester_config)
