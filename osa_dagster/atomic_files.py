"""Files replaced atomically, and pydantic models kept in them.

A leaf module: the engine, the artifact store and the SDK's neighbours all write state that a
crash must leave either old or new, never half written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data`: a crash leaves the old or the new, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must be in the same directory: a rename is atomic only
    # within one filesystem.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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
