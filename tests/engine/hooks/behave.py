"""A test hook that uses only the container contract (environment + JSON lines), no SDK.

Each record's metadata says what to do with it:
  outcome    "passed" (default), "rejected" or "errored"
  alloc_mb   allocate and touch this many MB first
  keep_mb    allocate and touch this many MB and keep them to the end (a leak)
  wait_for   a list of paths: wait until one of them exists first (at most 30 s), so that a
             test can hold a record back until the engine has done something
  sleep_s    sleep this long first (also a config default)
  file       read this file of the record and report its size as a feature
  sigkill    SIGKILL itself, once: only while config["once_file"] does not exist yet
config.json: {"ledger": path appended with the id of every record finished, "sleep_s": s}
"""

# Like a hook author with only the contract, json and os at hand (hence no pathlib).
# ruff: noqa: PTH110, PTH118, PTH123, PTH202

import json
import os
import signal
import sys
import time

EXIT_MEMORY_ERROR = 99  # the contract's "I ran out of memory"


def main():
    in_dir, out_dir = os.environ["OSA_IN"], os.environ["OSA_OUT"]
    with open(os.path.join(in_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(in_dir, "records.jsonl")) as f:
        records = [json.loads(line) for line in f]
    kept = []
    for record in records:
        meta = record["metadata"]
        wait_for_any(meta.get("wait_for", ()))
        time.sleep(meta.get("sleep_s", config.get("sleep_s", 0)))
        if meta.get("sigkill") and not os.path.exists(config["once_file"]):
            open(config["once_file"], "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        features = {"memory_limit_mb": int(os.environ["OSA_MEMORY_LIMIT_MB"])}
        if "alloc_mb" in meta:
            buffer = bytearray(meta["alloc_mb"] * 1024 * 1024)
            buffer[::4096] = b"\x01" * len(range(0, len(buffer), 4096))
            features["allocated_mb"] = len(buffer) // (1024 * 1024)
            del buffer
        if "keep_mb" in meta:
            kept.append(bytearray(meta["keep_mb"] * 1024 * 1024))
            kept[-1][::4096] = b"\x01" * len(range(0, len(kept[-1]), 4096))
        if "file" in meta:
            path = os.path.join(os.environ["OSA_FILES"], record["files_dir"], meta["file"])
            features["bytes"] = os.path.getsize(path)
        write_outcome(out_dir, record["id"], meta.get("outcome", "passed"), features)
        with open(config["ledger"], "a") as ledger:
            ledger.write(record["id"] + "\n")


def wait_for_any(paths, limit_s=30.0):
    """Bounded, so that a test whose engine never does what it waits for fails, not hangs."""
    deadline = time.monotonic() + limit_s
    while paths and not any(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)


def write_outcome(out_dir, record_id, outcome, features):
    if outcome == "passed":
        name, line = "features.jsonl", {"id": record_id, "features": [features]}
    elif outcome == "rejected":
        name, line = "rejections.jsonl", {"id": record_id, "reason": "rejected by the test"}
    else:
        name, line = "errors.jsonl", {"id": record_id, "error": "errored by the test"}
    with open(os.path.join(out_dir, name), "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()


if __name__ == "__main__":
    try:
        main()
    except MemoryError:
        sys.exit(EXIT_MEMORY_ERROR)
