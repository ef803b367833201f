"""Opening files that someone else controls: only regular files, never through a symlink,
never blocking. A leaf module: the engine reads hooks' output folders with it, the deposits
what people drop in.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import BinaryIO


def open_regular(folder: int, name: str) -> BinaryIO | str | None:
    """`name` in the folder `folder` opened for reading if it is a regular file; None when it
    does not exist; else what it is. Nothing but a regular file is ever opened for reading:
    a path-only handle is checked first, so a FIFO cannot block and a device is never
    opened, and no symlink is followed."""
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=folder)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(handle).st_mode
        if not stat.S_ISREG(mode):
            return KINDS.get(stat.S_IFMT(mode), "not a regular file")
        # Reopening the handle itself, not the name, reads the very file that was checked.
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None
        raise
    finally:
        os.close(handle)
    return os.fdopen(fd, "rb")


KINDS = {
    stat.S_IFLNK: "a symlink",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def open_folder(path: str | os.PathLike[str], dir_fd: int | None = None) -> int | str | None:
    """A descriptor of the folder at `path` (to close), opened without following a symlink;
    None when nothing is there; else what is there instead ("a symlink", "a FIFO"...)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
    mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode
    return KINDS.get(stat.S_IFMT(mode), "a file")


def open_folder_below(folder: int, parts: Sequence[str]) -> int | str | None:
    """A descriptor (to close) of the folder `parts` below the folder open as `folder`, each
    step opened without following a symlink, so that no link anywhere along the way leads
    elsewhere; None when a step is missing; else what the first step that is not a folder
    is, with its path ("x/y is a symlink")."""
    current = os.dup(folder)
    for depth, part in enumerate(parts):
        try:
            child = open_folder(part, dir_fd=current)
        finally:
            os.close(current)
        if not isinstance(child, int):
            return child if child is None else f"{'/'.join(parts[: depth + 1])} is {child}"
        current = child
    return current


def copy_data(source: int, target: int, size: int) -> bool:
    """Copy the first `size` bytes of the file open as `source` into `target` (a new, empty
    file) without turning holes into writes: only the extents that hold data are copied,
    and the target is then given its length. False when the source turned out shorter
    than `size` (it changed while it was copied)."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(source, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no data past `offset`, only a hole
                raise
            break
        if data >= size:
            break
        end = min(os.lseek(source, data, os.SEEK_HOLE), size)
        os.lseek(target, data, os.SEEK_SET)
        while data < end:
            sent = os.sendfile(target, source, data, end - data)
            if sent == 0:
                return False
            data += sent
        offset = end
    os.ftruncate(target, size)
    return True


class TooManyEntries(Exception):
    """A folder tree holds more entries than its reader agreed to look at."""


def tree_bytes(folder: int, max_entries: int) -> int:
    """What the folder tree under the descriptor `folder` takes: for each regular file the
    larger of its size and its allocated blocks, so that neither a sparse file nor a dense
    one hides; links are not followed. Raises TooManyEntries past `max_entries`."""
    total, seen, pending = 0, 0, [os.dup(folder)]
    try:
        while pending:
            current = pending.pop()
            try:
                with os.scandir(current) as entries:
                    for entry in entries:
                        seen += 1
                        if seen > max_entries:
                            raise TooManyEntries(f"more than {max_entries} entries")
                        info = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(info.st_mode):
                            total += max(info.st_size, info.st_blocks * 512)
                        elif stat.S_ISDIR(info.st_mode):
                            child = open_folder(entry.name, dir_fd=current)
                            if isinstance(child, int):
                                pending.append(child)
            finally:
                os.close(current)
    finally:
        for descriptor in pending:
            os.close(descriptor)
    return total
