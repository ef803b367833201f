"""A test hook that writes given raw text to its output files, whatever the records say.

config.json maps $OSA_MEMORY_LIMIT_MB (or "*") to a scenario:
  {"write": {"features.jsonl": "raw text", ...}, "fifo": ["errors.jsonl"],
   "symlink": {"features.jsonl": "/some/target"}, "stderr": "text", "sleep_s": 0, "exit": 0}
Text is written with surrogateescape, so "\\udcff" in the JSON config becomes the byte 0xff.
FIFOs and symlinks are made in $OSA_OUT after the writes, then the hook sleeps `sleep_s`.
"""

# Like a hook author with only the contract, json and os at hand (hence no pathlib).
# ruff: noqa: PTH118, PTH123, PTH211

import json
import os
import sys
import time


def main():
    with open(os.path.join(os.environ["OSA_IN"], "config.json")) as f:
        config = json.load(f)
    scenario = config.get(os.environ["OSA_MEMORY_LIMIT_MB"], config.get("*", {}))
    for name, text in scenario.get("write", {}).items():
        with open(os.path.join(os.environ["OSA_OUT"], name), "ab") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
    for name in scenario.get("fifo", []):
        os.mkfifo(os.path.join(os.environ["OSA_OUT"], name))
    for name, target in scenario.get("symlink", {}).items():
        os.symlink(target, os.path.join(os.environ["OSA_OUT"], name))
    sys.stderr.write(scenario.get("stderr", ""))
    sys.stderr.flush()
    time.sleep(scenario.get("sleep_s", 0))
    return scenario.get("exit", 0)


if __name__ == "__main__":
    sys.exit(main())
