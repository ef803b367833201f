"""Which of the orchestrator's data folders the sandbox covers, when they sit inside a code
folder (the default: .data inside the repository, which `python -m` puts on sys.path)."""

from __future__ import annotations

from pathlib import Path

from osa_dagster.engine.runners.sandbox import _visible


def test_a_data_folder_inside_another_is_covered_with_it(tmp_path: Path):
    data, artifacts, deposits = tmp_path / "data", tmp_path / "data" / "artifacts", tmp_path / "x"
    for folder in (artifacts, deposits):
        folder.mkdir(parents=True)
    outside = Path("/nonexistent-code")
    # Covering data/artifacts after data would need a mount point in data's empty,
    # read-only cover: bwrap fails every attempt ("Can't mkdir ...: Read-only file system").
    assert _visible([artifacts, data, deposits], [tmp_path]) == [data, deposits]
    assert _visible([artifacts, data], [outside]) == []
