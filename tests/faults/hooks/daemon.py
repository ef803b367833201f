"""A test hook that settles every record and leaves a child behind that would run for 10 minutes.

config.json:
  mode      "setsid": the child double-forks into a new session (a daemon: another process
            group, parent init), so killing the hook's group does not reach it;
            "holder": a plain child in the hook's group that ignores SIGTERM and SIGHUP.
  pid_file  where the child writes its pid once it runs (outside $OSA_OUT)
Either way the child keeps features.jsonl and the hook's stdout open, and appends a line to
features.jsonl every 20 ms. The hook exits 0 once the child's pid file is written.
Uses only the container contract (environment + JSON lines), no SDK.
"""

# Like a hook author with only the contract, json and os at hand (hence no pathlib).
# ruff: noqa: PTH104, PTH110, PTH118, PTH123

import json
import os
import signal
import time

LIFETIME_S = 600


def outlive_the_hook(features_fd, line, pid_file):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    partial = pid_file + ".partial"
    with open(partial, "w") as f:
        f.write(str(os.getpid()))
    os.rename(partial, pid_file)
    deadline = time.monotonic() + LIFETIME_S
    while time.monotonic() < deadline:
        os.write(features_fd, line)
        time.sleep(0.02)
    os._exit(0)


def main():
    with open(os.path.join(os.environ["OSA_IN"], "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(os.environ["OSA_IN"], "records.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f]
    path = os.path.join(os.environ["OSA_OUT"], "features.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lines = [(json.dumps({"id": i, "features": []}) + "\n").encode() for i in ids]
    for line in lines:
        os.write(fd, line)
    if os.fork() == 0:
        if config["mode"] == "setsid":
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
        outlive_the_hook(fd, lines[0], config["pid_file"])
    while not os.path.exists(config["pid_file"]):
        time.sleep(0.01)


if __name__ == "__main__":
    main()
