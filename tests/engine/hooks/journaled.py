"""Runs another hook as a child and journals, from the kernel, the memory limit it ran under.

    journaled.py JOURNAL HOOK_COMMAND...

Appends "start <CLOCK_MONOTONIC ns> <limit bytes> <pid>" before the child starts and
"end <ns> <pid>" after it ended, however it ended (the OOM killer picks the child, the
largest process of the cgroup), then exits as the child did. The limit is the
`memory.limit_in_bytes` of the cgroup this process is in, as /proc/self/cgroup names it:
what the kernel enforces, not what the engine meant to ask for.
"""

# ruff: noqa: PTH123

import os
import subprocess
import sys
import time

CGROUP_ROOT = "/sys/fs/cgroup/memory"


def own_limit_bytes():
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                with open(CGROUP_ROOT + path + "/memory.limit_in_bytes") as limit:
                    return int(limit.read())
    raise SystemExit("no memory cgroup")


def journal(path, line):
    # One write of a short line to a file opened for appending: never interleaved.
    with open(path, "a") as f:
        f.write(line + "\n")


def main():
    path, command = sys.argv[1], sys.argv[2:]
    journal(path, f"start {time.monotonic_ns()} {own_limit_bytes()} {os.getpid()}")
    returncode = subprocess.call(command)
    journal(path, f"end {time.monotonic_ns()} {os.getpid()}")
    sys.exit(128 - returncode if returncode < 0 else returncode)


if __name__ == "__main__":
    main()
