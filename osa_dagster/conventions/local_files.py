"""What the ingesters of local folders share: finding a ref's file again at fetch time."""

from __future__ import annotations

from pathlib import Path

from osa_sdk.types import RecordRef


def file_of_ref(root: Path, ref: RecordRef, key: str = "path") -> Path:
    """The file that discover noted in `ref.extra[key]`, relative to the folder `root`
    (resolved); a ValueError says why the ref names no file inside it."""
    relative = ref.extra.get(key)
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"the ref of {ref.source_id} has no file path (extra[{key!r}])")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{relative!r} is outside the folder {root}")
    return path
