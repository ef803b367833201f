"""The layers import downward only: each package is imported in a fresh interpreter (this
process may have anything loaded by other tests) and must not pull in the layers above it."""

import subprocess
import sys

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
