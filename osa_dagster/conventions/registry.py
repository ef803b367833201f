"""Finding conventions: the bundled ones plus those in modules named by OSA_CONVENTIONS.

A module offers conventions through a module-level ``CONVENTIONS`` list. Memory
ladders can be changed per hook without code through OSA_HOOK_MEMORY, e.g.
``OSA_HOOK_MEMORY="pdb.extract_features=128:1024"`` (base MB, optional cap MB), and the
source a convention reads through OSA_SOURCES: a source's name, a location (a folder or
file, or a URL for a source that takes one) or both as NAME:LOCATION, e.g.
``OSA_SOURCES="pdb=/data/pdb,uniprot=rest,geo=ncbi"``.

One variable for every convention rather than one per convention: it is the form the
named sources already had, one place lists where everything comes from, and it is passed
to step containers and pods as a whole. Its one limit is that a location cannot contain a
comma.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from osa_dagster.conventions.base import Convention
from osa_dagster.settings import Settings

BUNDLED_MODULES = (
    "osa_dagster.conventions.pdb",
    "osa_dagster.conventions.uniprot",
    "osa_dagster.conventions.geo",
)


class ConventionError(ValueError):
    """A convention module or setting that cannot be used, with what and where."""


def _conventions_of(module_name: str) -> list[Convention]:
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConventionError(
            f"cannot import convention module {module_name!r}: {error}"
        ) from error
    found = getattr(module, "CONVENTIONS", None)
    if not isinstance(found, list | tuple) or not all(isinstance(c, Convention) for c in found):
        raise ConventionError(
            f"module {module_name!r} must define CONVENTIONS, a list of Convention objects"
        )
    return list(found)


def _with_memory_overrides(convention: Convention, settings: Settings) -> Convention:
    hooks = []
    for spec in convention.hooks:
        override = settings.memory_override(convention.name, spec.name)
        if override is not None:
            cap = override.cap_mb or spec.memory.cap_mb
            if cap < override.base_mb:
                # Settings refuse a cap below the base of the same entry; this is a base
                # above the hook's own cap.
                raise ConventionError(
                    f"OSA_HOOK_MEMORY entry {convention.name}.{spec.name}={override.base_mb}: "
                    f"the base is above the hook's cap ({cap} MB); give BASE_MB:CAP_MB"
                )
            memory = spec.memory.model_copy(update={"base_mb": override.base_mb, "cap_mb": cap})
            spec = spec.model_copy(update={"memory": memory})
        hooks.append(spec)
    return convention.model_copy(update={"hooks": tuple(hooks)})


def load_conventions(
    settings: Settings, extra_modules: Iterable[str] | None = None
) -> dict[str, Convention]:
    """Every available convention by name, with the settings' sources and memory overrides;
    names must be unique across modules. The modules are the bundled ones and
    `extra_modules` (None: the settings' OSA_CONVENTIONS)."""
    if extra_modules is None:
        extra_modules = settings.conventions
    modules = [*BUNDLED_MODULES, *(m.strip() for m in extra_modules if m.strip())]
    sources = settings.sources
    conventions: dict[str, Convention] = {}
    for module_name in dict.fromkeys(modules):
        for convention in _conventions_of(module_name):
            if convention.name in conventions:
                raise ConventionError(
                    f"convention {convention.name!r} from {module_name!r} is already defined"
                )
            if convention.name in sources:
                try:
                    convention = convention.choose_source(sources[convention.name])
                except ValueError as error:
                    raise ConventionError(f"OSA_SOURCES: {error}") from error
            conventions[convention.name] = _with_memory_overrides(convention, settings)
    if unknown_sources := sorted(set(sources) - set(conventions)):
        raise ConventionError(f"OSA_SOURCES names conventions that do not exist: {unknown_sources}")
    known = {f"{c.name}.{h.name}" for c in conventions.values() for h in c.hooks}
    if unknown := sorted(set(settings.hook_memory) - known):
        names = ", ".join(unknown)
        raise ConventionError(f"OSA_HOOK_MEMORY names hooks that do not exist: {names}")
    return conventions
