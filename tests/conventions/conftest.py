"""Fixtures for convention tests: a local fake of the upstream services."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conventions.fake_upstream import FakeUpstream


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A fresh fake upstream server on 127.0.0.1 for one test; routes start empty."""
    with FakeUpstream() as upstream:
        yield upstream
    assert not upstream.errors, f"fake upstream handlers raised: {upstream.errors!r}"
