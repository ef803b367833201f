"""Bulk ingestion of public scientific databases into the OSA archive."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("osa-dagster")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"
