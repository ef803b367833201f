"""A test hook that writes given raw text to its output files, whatever the records say.

config.json maps $OSA_MEMORY_LIMIT_MB (or "*") to a scenario:
  {"write": {"features.jsonl": "raw text", ...}, "stderr": "text", "exit": 0}
Text is written with surrogateescape, so "\\udcff" in the JSON config becomes the byte 0xff.
"""

# Like a hook author with only the contract, json and os at hand (hence no pathlib).
# ruff: noqa: PTH118, PTH123

import json
import os
import sys


def main():
    with open(os.path.join(os.environ["OSA_IN"], "config.json")) as f:
        config = json.load(f)
    scenario = config.get(os.environ["OSA_MEMORY_LIMIT_MB"], config.get("*", {}))
    for name, text in scenario.get("write", {}).items():
        with open(os.path.join(os.environ["OSA_OUT"], name), "ab") as f:
            f.write(text.encode("utf-8", "surrogateescape"))
    sys.stderr.write(scenario.get("stderr", ""))
    return scenario.get("exit", 0)


if __name__ == "__main__":
    sys.exit(main())
