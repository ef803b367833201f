"""A convention: what one upstream database brings into the archive.

A convention bundles an ingester (discover + fetch), the hooks every record must pass,
and the shape of its record metadata. The project ships some; users add their own in
modules named by OSA_CONVENTIONS (see registry.py), without editing the project.
"""

from __future__ import annotations

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

    def make_ingester(self) -> Ingester:
        return self.ingester(**self.ingester_config)
