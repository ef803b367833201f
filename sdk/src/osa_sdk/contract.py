"""The hook container contract: environment names, file names, and the one id -> folder rule.

Everything that touches a batch folder (the SDK runtime, the hook engine's runners, the
artifact store layout) imports these names from here, so they can never drift apart.
See docs/contract.md for the contract as a hook author reads it.
"""

from __future__ import annotations

import hashlib
import re

# Environment variables a hook process receives.
ENV_IN = "OSA_IN"
ENV_OUT = "OSA_OUT"
ENV_FILES = "OSA_FILES"
ENV_HOOK_NAME = "OSA_HOOK_NAME"
ENV_MEMORY_LIMIT_MB = "OSA_MEMORY_LIMIT_MB"

# Files inside $OSA_IN.
RECORDS_FILE = "records.jsonl"
CONFIG_FILE = "config.json"

# Files inside $OSA_OUT, one JSON object per line.
FEATURES_FILE = "features.jsonl"
REJECTIONS_FILE = "rejections.jsonl"
ERRORS_FILE = "errors.jsonl"
OUTPUT_FILES = (FEATURES_FILE, REJECTIONS_FILE, ERRORS_FILE)

# What an ingest writes into its output folder: records.jsonl (RECORDS_FILE), the files
# under FILES_DIR/<files_dir_for(source_id)>/, and the report, written last.
FILES_DIR = "files"
INGEST_REPORT_FILE = "ingest_report.json"

# One unit of size for files and memory alike, so that a record's size and the memory limits
# it runs under compare directly: MB means 2^20 bytes (a mebibyte, as cgroups, Docker and
# Kubernetes' "Mi" count memory) in every *_mb name: size_mb, max_file_mb, size_hint_mb,
# memory_limit_mb, peak_memory_mb.
BYTES_PER_MB = 1024 * 1024


def bytes_to_mb(num_bytes: int) -> float:
    """The size in MB (2^20 bytes) of `num_bytes` bytes, unrounded."""
    return num_bytes / BYTES_PER_MB


# Longest file name a record may have: the limit of common filesystems, in bytes.
MAX_FILE_NAME_BYTES = 255


def file_name_error(name: str) -> str | None:
    """Why `name` cannot be the name of a file in a record's folder, or None if it can.

    A file name is exactly one path component, so a record's files can never land in
    another record's folder or outside the batch.
    """
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is a directory reference, not a file name"
    if "/" in name or "\x00" in name:
        return "contains '/' or NUL: a file name is one path component, such as '1abc.cif'"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # bytes a filesystem listing decoded as surrogate escapes
        return "is not valid UTF-8: name files in UTF-8"
    if len(encoded) > MAX_FILE_NAME_BYTES:
        return f"is longer than {MAX_FILE_NAME_BYTES} bytes"
    return None


# Longest folder name we produce: well under the 255-byte limit of common filesystems,
# leaving room for suffixes that tools add (".tmp", ".partial").
MAX_FOLDER_NAME = 160
_HASHED_PREFIX = MAX_FOLDER_NAME - 2 - 64
_LITERAL = re.compile(r"[A-Za-z0-9.\-]")


def files_dir_for(record_id: str) -> str:
    """Map an upstream record id to a path-safe folder name.

    Injective: characters outside ``[A-Za-z0-9.-]`` (and ``_`` itself, and a leading
    ``.``) become ``_`` followed by the two hex digits of each UTF-8 byte, so two ids
    never share a name. The result never contains ``/``, is never ``.`` or ``..``, and
    never starts with ``.``, so it cannot escape or hide in its batch folder.

    Names longer than MAX_FOLDER_NAME keep a readable prefix and end in ``__`` plus a
    SHA-256 of the id. ``__`` cannot occur in an encoded name (an escape ``_`` is always
    followed by a hex digit), so hashed names never collide with plain ones.
    """
    if not record_id:
        raise ValueError("record id is empty: every record needs a non-empty upstream id")
    encoded = []
    for position, char in enumerate(record_id):
        if _LITERAL.fullmatch(char) and not (position == 0 and char == "."):
            encoded.append(char)
        else:
            encoded.append("".join(f"_{byte:02x}" for byte in char.encode("utf-8")))
    name = "".join(encoded)
    if len(name) <= MAX_FOLDER_NAME:
        return name
    digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()
    prefix = name[:_HASHED_PREFIX]
    # Never cut an escape in half: a dangling "_" or "_x" would make the prefix ambiguous.
    cut = prefix.rfind("_", len(prefix) - 3)
    if cut != -1:
        prefix = prefix[:cut]
    return f"{prefix}__{digest}"


# What the engine takes from a hook, whatever the hook writes: every outcome line and feature
# row becomes memory in the orchestrator and rows in the records database, so both are
# bounded. A feature row describes a record (a handful per record is usual); a hook with more
# to say than this writes a file. A record over a per-record cap is errored with the cap in
# its reason. The per-batch caps count what a hook's checkpoint holds for the batch, over all
# its attempts: the attempt that goes over one is stopped and its records left are errored.
# A batch's rows are stored in one transaction, which 100,000 rows keep to seconds.
MAX_OUTCOME_LINE_BYTES = 4 * BYTES_PER_MB
MAX_FEATURE_ROWS_PER_RECORD = 10_000
MAX_FEATURE_ROWS_PER_BATCH = 100_000
MAX_FEATURE_BYTES_PER_BATCH = 32 * BYTES_PER_MB


# Exit code of a hook or ingest whose setup is wrong (a missing env var, an unimportable
# target, a malformed input line): retrying it, with any memory, cannot help.
EXIT_CONTRACT_ERROR = 2

# Exit code with which a hook says "I ran out of memory" when no kernel OOM killer is
# watching it (OSA_HOOK_MEMORY_LIMITS=rlimit turns an over-limit allocation into MemoryError).
# The engine treats it like an OOM kill: the records left are retried with more memory.
EXIT_MEMORY_ERROR = 99
