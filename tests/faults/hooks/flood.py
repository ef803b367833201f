"""A test hook that floods $OSA_OUT: it settles every record, and writes `bytes` of output.

config.json:
  mode   "one_line": the first record's features line is `bytes` long, written in chunks
         of 1 MiB over time (the reader sees a line growing without its newline);
         "many_lines": every record gets a small outcome line, then lines of about 1 MiB
         for ids that are not in the batch follow until `bytes` are written.
  bytes  how much to write
Uses only the container contract (environment + JSON lines), no SDK.
"""

# Like a hook author with only the contract, json and os at hand (hence no pathlib).
# ruff: noqa: PTH118, PTH123

import json
import os

CHUNK = 1 << 20


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main():
    with open(os.path.join(os.environ["OSA_IN"], "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(os.environ["OSA_IN"], "records.jsonl")) as f:
        ids = [json.loads(line)["id"] for line in f]
    path = os.path.join(os.environ["OSA_OUT"], "features.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    total = config["bytes"]
    small = [
        (json.dumps({"id": i, "features": [{"n": n}]}) + "\n").encode() for n, i in enumerate(ids)
    ]
    if config["mode"] == "one_line":
        head = json.dumps({"id": ids[0], "features": [{"blob": ""}]}).encode()
        opening, closing = head[: head.rindex(b'""') + 1], head[head.rindex(b'""') + 1 :] + b"\n"
        write_all(fd, opening)
        blob = b"x" * CHUNK
        full, rest = divmod(total - len(opening) - len(closing), CHUNK)
        for _ in range(full):
            write_all(fd, blob)
        write_all(fd, blob[:rest] + closing)
        for line in small[1:]:
            write_all(fd, line)
    else:
        for line in small:
            write_all(fd, line)
        # Built once and written as fast as the kernel takes it: a flood, not a trickle.
        line = (
            json.dumps({"id": "not-in-batch", "features": [{"f": "x" * (CHUNK - 64)}]}) + "\n"
        ).encode()
        for _ in range(max(0, total - sum(map(len, small))) // len(line) + 1):
            write_all(fd, line)
    os.close(fd)


if __name__ == "__main__":
    main()
