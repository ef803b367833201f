"""Files replaced atomically, and pydantic models kept in them.

A leaf module: the engine, the artifact store and the SDK's neighbours all write state that a
crash must leave either old or new, never half written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data`: a crash leaves the old or the new, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomically_at(folder, path.name, data)
    finally:
        os.close(folder)


def write_atomically_at(folder: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `name` in the folder open as the descriptor `folder` with `data` (`mode`
    before the umask): a crash leaves the old or the new, durably. Nothing is followed: the
    temporary file is created where no file was (O_EXCL, O_NOFOLLOW) and renamed within the
    folder, so a symlink planted at either name is replaced, never written through."""
    # The temporary file must be in the same directory: a rename is atomic only
    # within one filesystem.
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=folder)
        raise
    # Make the rename itself durable.
    os.fsync(folder)


class JsonModelFile(Generic[M]):
    """One model in one JSON file, replaced atomically; subclasses name the model."""

    model: ClassVar[type[BaseModel]]

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> M | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return self.model.model_validate_json(data)  # type: ignore[return-value]

    def save(self, value: M) -> None:
        write_atomically(self.path, value.model_dump_json().encode())
