"""Every distribution the code imports is declared: a package that arrives only as another's
dependency can go away with that package's next release."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What each folder's code may import, beside the standard library and its own modules.
DECLARED_BY = {
    "osa_dagster": ("pyproject.toml", ["dependencies"]),
    "sdk/src": ("sdk/pyproject.toml", ["dependencies", "s3"]),
    "sdk/tests": ("sdk/pyproject.toml", ["dependencies", "s3", "test"]),
    "tests": ("pyproject.toml", ["dependencies", "dev"]),
    "bench": ("pyproject.toml", ["dependencies", "dev"]),
    "scripts": ("pyproject.toml", ["dependencies", "dev"]),
    "images": ("pyproject.toml", ["dependencies", "dev"]),
}
# Importable folders of the repository (pytest's pythonpath, the SDK's source).
SOURCE_ROOTS = (REPO, REPO / "sdk" / "src")


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement such as `moto[server]==5.2.5`."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement)[0]).lower()


def _declared(pyproject: str, groups: list[str]) -> set[str]:
    project = tomllib.loads((REPO / pyproject).read_text())["project"]
    extras = project.get("optional-dependencies", {})
    requirements = [
        r for g in groups for r in (project["dependencies"] if g == "dependencies" else extras[g])
    ]
    return {_name(r) for r in requirements} | {_name(project["name"])}


def _imported(path: Path) -> set[str]:
    """Top-level names of what the file imports, absolute imports only."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _local(module: str, path: Path) -> bool:
    """Whether `module` is the repository's own: beside the file, or in a source root."""
    return any(
        (folder / module).is_dir() or (folder / f"{module}.py").is_file()
        for folder in (path.parent, *SOURCE_ROOTS)
    )


def test_every_imported_distribution_is_declared():
    distributions = packages_distributions()
    undeclared = []
    for folder, (pyproject, groups) in DECLARED_BY.items():
        declared = _declared(pyproject, groups)
        for path in sorted((REPO / folder).rglob("*.py")):
            for module in sorted(_imported(path)):
                if module in sys.stdlib_module_names or _local(module, path):
                    continue
                found = {_name(d) for d in distributions.get(module, [])}
                if not found & declared:
                    where = path.relative_to(REPO)
                    undeclared.append(f"{where}: {module} ({', '.join(found) or 'not installed'})")
    assert not undeclared, "imported but not declared:\n" + "\n".join(undeclared)
