"""A hook that probes its sandbox, for the container runner tests.

It is copied into a test image beside the shipped hooks and run as
``python3 -m osa_sdk hook sandbox_probe:probe``. Each record's metadata says what to try:
  alloc_mb   allocate and touch this many MB
  sleep_s    sleep this long first
  connect    "host:port" to open a TCP connection to
  write      a path to create a file at
Every passed record reports the names and sizes of its files, as the hook sees them.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from osa_sdk import HookRecord, hook


@hook
def probe(record: HookRecord) -> dict[str, Any]:
    meta = record.metadata
    time.sleep(meta.get("sleep_s", 0))
    if "alloc_mb" in meta:
        buffer = bytearray(meta["alloc_mb"] * 1024 * 1024)
        buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))
        del buffer
    if "connect" in meta:
        host, _, port = meta["connect"].rpartition(":")
        socket.create_connection((host, int(port)), timeout=5).close()
    if "write" in meta:
        with open(meta["write"], "w") as f:  # noqa: PTH123
            f.write("written by the probe\n")
    return {
        "files": {p.name: p.stat().st_size for p in record.files()},
        "uid": os.getuid(),
        "memory_limit_mb": int(os.environ["OSA_MEMORY_LIMIT_MB"]),
    }
