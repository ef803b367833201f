"""The project's settings: every OSA_* variable in one place."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIR = Path(".data")


def data_dir() -> Path:
    """The project's data folder: OSA_DATA_DIR, else .data in the working directory."""
    return Path(os.environ.get("OSA_DATA_DIR", "").strip() or DEFAULT_DATA_DIR).resolve()
