"""Fixtures of the SDK's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdk_test_support import Batch


@pytest.fixture
def batch(tmp_path: Path) -> Batch:
    paths = [tmp_path / "in", tmp_path / "out", tmp_path / "files"]
    for path in paths:
        path.mkdir()
    return Batch(*paths)
