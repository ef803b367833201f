"""The memory ladder: doubling from the base, and always ending at the cap."""

from __future__ import annotations

import pytest

from osa_dagster.engine import MemoryPolicy


@pytest.mark.parametrize(
    ("base_mb", "cap_mb", "ladder"),
    [
        (192, 4096, [192, 384, 768, 1536, 3072, 4096]),
        (1024, 8192, [1024, 2048, 4096, 8192]),
        (128, 300, [128, 256, 300]),
        (256, 256, [256]),
    ],
)
def test_the_ladder_doubles_from_the_base_and_ends_at_the_cap(
    base_mb: int, cap_mb: int, ladder: list[int]
) -> None:
    policy = MemoryPolicy(base_mb=base_mb, cap_mb=cap_mb)
    assert policy.ladder() == ladder
    assert policy.climbs() == len(ladder) - 1
    assert policy.next_after(ladder[-2] if len(ladder) > 1 else 0) == cap_mb
    assert policy.next_after(cap_mb) is None


def test_a_factor_near_one_still_climbs_to_the_cap() -> None:
    assert MemoryPolicy(base_mb=1, factor=1.01, cap_mb=4).ladder() == [1, 2, 3, 4]
