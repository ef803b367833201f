"""The Dagster features our definitions use although Dagster marks them beta or preview.

We chose each one knowingly (the reason is beside its use), so the warning Dagster issues
every time a definition uses it says nothing new to the person running a command: it is
silenced only while our own definitions are built, and only for these features. Any other
beta or preview warning, or one from someone else's code, still shows.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

# (warning class, start of its message): one line per feature we use.
KNOWN_BETA_FEATURES: tuple[tuple[type[Warning], str], ...] = (
    # defs/assets.py: runs over ranges of adjacent batches.
    (dg.BetaWarning, "Parameter `backfill_policy` of function `asset`"),
    # defs/checks.py: checks partitioned like their assets, a verdict per batch.
    (dg.PreviewWarning, "Specifying a partitions_def on an AssetCheckSpec"),
)


@contextmanager
def known_beta_features_quiet() -> Iterator[None]:
    """Build definitions inside this: the warnings of KNOWN_BETA_FEATURES are not shown."""
    with warnings.catch_warnings():
        for category, message in KNOWN_BETA_FEATURES:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        yield
