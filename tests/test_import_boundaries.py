"""The layers import downward only: each package is imported in a fresh interpreter (this
process may have anything loaded by other tests) and must not pull in the layers above it."""

import ast
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ABOVE_ENGINE = ("dagster", "osa_dagster.batch", "osa_dagster.defs", "osa_dagster.conventions")
LOWER_LAYERS = {
    # the engine: pure Python, no orchestrator, no store, no records database
    "osa_dagster.engine": (*ABOVE_ENGINE, "osa_dagster.storage", "osa_dagster.records"),
    "osa_dagster.engine.runners.docker": (*ABOVE_ENGINE, "osa_dagster.storage"),
    "osa_dagster.engine.runners.kubernetes": (*ABOVE_ENGINE, "osa_dagster.storage"),
    "osa_dagster.storage": (*ABOVE_ENGINE, "osa_dagster.engine", "osa_dagster.records"),
    "osa_dagster.storage.s3": (*ABOVE_ENGINE, "osa_dagster.engine", "osa_dagster.records"),
    "osa_dagster.records": (*ABOVE_ENGINE, "osa_dagster.engine", "osa_dagster.storage"),
    "osa_dagster.conventions.registry": ("dagster", "osa_dagster.batch", "osa_dagster.defs"),
    "osa_dagster.batch.audit": ("dagster", "osa_dagster.defs"),
    "osa_dagster.batch.deposits": ("dagster", "osa_dagster.defs"),
    "osa_dagster.batch.lease": ("dagster", "osa_dagster.defs", "osa_dagster.storage"),
}


@pytest.mark.parametrize("module", sorted(LOWER_LAYERS))
def test_a_layer_imports_nothing_above_it(module: str) -> None:
    forbidden = LOWER_LAYERS[module]
    code = (
        f"import sys, {module}\n"
        f"forbidden = {forbidden!r}\n"
        "loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') "
        "or (f == 'dagster' and m.split('.')[0].startswith('dagster')) for f in forbidden))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} imports {result.stdout.strip()} {result.stderr}"


# Settings are parsed once at the edges (the CLI, the Dagster layer) and passed down: a layer
# below them that read the environment itself would be untestable without it, and would
# make the UI's Resources page tell less than what runs.
SETTINGS_FREE = ("engine", "storage", "records", "batch", "conventions")
# osa_dagster.settings's readers of the environment; Settings.from_env is told apart from
# others of that name (docker.from_env) by its class.
SETTINGS_READERS = {"settings", "data_dir"}
PACKAGE = Path(__file__).resolve().parents[1] / "osa_dagster"


def _settings_reads(source: str) -> Iterator[tuple[int, str]]:
    """(line, what) of every call that parses the settings and every OSA_* variable read
    from os.environ (or os.getenv) in `source`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = node.func
            name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
            if name in SETTINGS_READERS or _is_settings_from_env(called):
                yield node.lineno, f"{name}()"
            if name == "getenv" and _names_osa_variable(node.args[:1]):
                yield node.lineno, "os.getenv('OSA_...')"
            if _is_environ(called) and _names_osa_variable(node.args[:1]):
                yield node.lineno, "os.environ.get('OSA_...')"
        if (
            isinstance(node, ast.Subscript)
            and _is_environ(node.value)
            and _names_osa_variable([node.slice])
        ):
            yield node.lineno, "os.environ['OSA_...']"


def _is_settings_from_env(called: ast.expr) -> bool:
    return (
        isinstance(called, ast.Attribute)
        and called.attr == "from_env"
        and isinstance(called.value, ast.Name)
        and called.value.id == "Settings"
    )


def _is_environ(node: ast.expr) -> bool:
    target = node.value if isinstance(node, ast.Attribute) and node.attr == "get" else node
    return isinstance(target, ast.Attribute) and target.attr == "environ"


def _names_osa_variable(args: Sequence[ast.expr]) -> bool:
    return any(isinstance(arg, ast.Constant) and str(arg.value).startswith("OSA_") for arg in args)


@pytest.mark.parametrize("layer", SETTINGS_FREE)
def test_a_layer_below_the_edges_reads_no_settings(layer: str) -> None:
    reads = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for line, what in _settings_reads(path.read_text())
    ]
    assert reads == []


def test_the_scan_finds_each_way_of_reading_settings() -> None:
    source = (
        "settings()\nSettings.from_env()\ndata_dir()\nos.environ['OSA_STORAGE']\n"
        "os.environ.get('OSA_DOMAIN')\nos.getenv('OSA_EXECUTOR')\nos.environ.get('PATH')\n"
        "docker.from_env()\n"
    )
    assert [line for line, _ in _settings_reads(source)] == [1, 2, 3, 4, 5, 6]
