"""What hook and ingester authors write against: Ingester, @ingester, FetchContext, @hook."""

from __future__ import annotations

import abc
import functools
import inspect
import shutil
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, ClassVar, TypeVar, overload

from osa_sdk.contract import bytes_to_mb, file_name_error, files_dir_for
from osa_sdk.types import HookRecord, IngesterFileRef, IngesterRecord, RecordRef, SkippedSource

_COPY_CHUNK = 1 << 20

# Ingesters


class FetchContext:
    """Where `Ingester.fetch` puts a batch's files, and how it reports refs it could not fetch.

    Built by the runtime; an ingester only calls its methods. A file of record `source_id`
    lands in ``<files_root>/<files_dir_for(source_id)>/<name>``. It is written under a
    temporary name and renamed once complete, so a file that is visible is whole, and its
    `size_mb` (decimal MB: bytes / 10^6) is measured from the bytes on disk.

    `max_file_mb` is the ingester's limit: records with a larger file are dropped by the
    runtime after fetch, so an ingester may skip downloading them (compare it with
    `RecordRef.size_hint_mb`). Methods may be called from several threads.
    """

    def __init__(
        self,
        files_root: Path,
        max_file_mb: float | None = None,
        source_ids: Collection[str] | None = None,
    ) -> None:
        self.files_root = files_root
        self.max_file_mb = max_file_mb
        self._source_ids = frozenset(source_ids) if source_ids is not None else None
        self._lock = threading.Lock()
        self._names: dict[str, set[str]] = {}
        self._failures: dict[str, str] = {}

    @property
    def failures(self) -> dict[str, str]:
        """source_id -> error of every ref reported with `fail`."""
        with self._lock:
            return dict(self._failures)

    def record_dir(self, source_id: str) -> Path:
        """The folder of a record's files (it may not exist yet)."""
        return self.files_root / files_dir_for(source_id)

    def add_file(self, source_id: str, src: Path, name: str | None = None) -> IngesterFileRef:
        """Copy `src` into the record's folder as `name` (default: the name of `src`)."""
        pending = self.open_file(source_id, src.name if name is None else name)
        with pending as out, src.open("rb") as data:
            shutil.copyfileobj(data, out, _COPY_CHUNK)
        return pending.ref

    def add_bytes(self, source_id: str, name: str, data: bytes) -> IngesterFileRef:
        """Write `data` into the record's folder as `name`."""
        pending = self.open_file(source_id, name)
        with pending as out:
            out.write(data)
        return pending.ref

    def open_file(self, source_id: str, name: str) -> PendingFile:
        """Stream a file into the record's folder, e.g. a download too big for memory::

            pending = ctx.open_file(ref.source_id, "1abc.cif.gz")
            with pending as out:
                for chunk in response.iter_content(1 << 20):
                    out.write(chunk)
            files.append(pending.ref)

        If the with-block raises, the partial file is removed and the name is free again.
        """
        self._check_source_id(source_id)
        problem = file_name_error(name)
        if problem is not None:
            raise ValueError(f"record {source_id!r}: file name {name!r} {problem}")
        with self._lock:
            names = self._names.setdefault(source_id, set())
            if name in names:
                raise ValueError(f"record {source_id!r}: a file named {name!r} was already added")
            names.add(name)
        return PendingFile(self, source_id, name)

    def fail(self, source_id: str, error: str) -> None:
        """Report that one ref could not be fetched; the rest of the batch goes on."""
        self._check_source_id(source_id)
        with self._lock:
            if source_id in self._failures:
                raise ValueError(
                    f"record {source_id!r} was already reported failed "
                    f"({self._failures[source_id]!r})"
                )
            self._failures[source_id] = error

    def _release_name(self, source_id: str, name: str) -> None:
        with self._lock:
            self._names[source_id].discard(name)

    def _check_source_id(self, source_id: str) -> None:
        if self._source_ids is not None and source_id not in self._source_ids:
            raise ValueError(f"record {source_id!r} is not one of the refs given to this fetch")


class PendingFile:
    """A file being written through `FetchContext.open_file`.

    Entering it yields a binary stream; `ref` is available once the with-block has ended
    without an exception.
    """

    def __init__(self, ctx: FetchContext, source_id: str, name: str) -> None:
        self._ctx = ctx
        self.source_id = source_id
        self.name = name
        self._final = ctx.record_dir(source_id) / name
        # A hidden, unique temporary name: a crash mid-download never leaves a file that
        # looks complete, and concurrent writers to one folder never collide.
        self._partial = self._final.with_name(f".osa-partial-{uuid.uuid4().hex}")
        self._stream: BinaryIO | None = None
        self._ref: IngesterFileRef | None = None

    def __enter__(self) -> BinaryIO:
        if self._stream is not None or self._ref is not None:
            raise RuntimeError(f"record {self.source_id!r}: file {self.name!r} is opened twice")
        try:
            self._final.parent.mkdir(parents=True, exist_ok=True)
            self._stream = self._partial.open("xb")
        except BaseException:
            self._discard()
            raise
        return self._stream

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stream is not None, "__exit__ without __enter__"
        self._stream.close()
        if exc_type is not None:
            self._discard()
            return
        try:
            self._partial.replace(self._final)
        except BaseException:
            self._discard()
            raise
        self._ref = IngesterFileRef(
            name=self.name,
            path=self.name,
            size_mb=bytes_to_mb(self._final.stat().st_size),
        )

    def _discard(self) -> None:
        self._partial.unlink(missing_ok=True)
        self._ctx._release_name(self.source_id, self.name)

    @property
    def ref(self) -> IngesterFileRef:
        if self._ref is None:
            raise RuntimeError(
                f"record {self.source_id!r}: file {self.name!r} is not complete; "
                "read .ref after its with-block has ended without an error"
            )
        return self._ref


class Ingester(abc.ABC):
    """Lists and fetches the records of one upstream database.

    Subclass it, implement `discover` and `fetch`, and decorate the class with
    `@ingester(name=..., max_file_mb=...)`. Keyword arguments of the constructor are the
    convention's configuration, kept in `self.config`.
    """

    name: ClassVar[str]
    max_file_mb: ClassVar[float | None] = None

    def __init__(self, **config: Any) -> None:
        self.config = config

    @property
    def skipped(self) -> list[SkippedSource]:
        """What `discover` reported with `skip` so far."""
        return list(vars(self).get("_skipped", ()))

    def skip(self, where: str, reason: str) -> None:
        """Report a part of the source that `discover` leaves out (a file it cannot read, a
        second file of a record it already found): the plan goes on without it and lists
        it with `reason`, where a raised error would stop the whole plan."""
        vars(self).setdefault("_skipped", []).append(SkippedSource(where=where, reason=reason))

    @abc.abstractmethod
    def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
        """Yield refs of records changed since `since` (all when None), at most `limit`."""

    @abc.abstractmethod
    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterable[IngesterRecord]:
        """Yield one record per ref that could be fetched; report the others with ctx.fail.

        Write files with ctx.add_file / add_bytes / open_file and put the refs they return
        in the record's `files`.
        """


IngesterClass = TypeVar("IngesterClass", bound=type[Ingester])


def ingester(
    name: str, max_file_mb: float | None = None
) -> Callable[[IngesterClass], IngesterClass]:
    """Class decorator naming an Ingester subclass and setting its file size limit (decimal MB)."""
    if not name:
        raise ValueError("@ingester needs a non-empty name")
    if max_file_mb is not None and max_file_mb <= 0:
        raise ValueError(f"@ingester({name!r}): max_file_mb must be positive, got {max_file_mb}")

    def decorate(cls: IngesterClass) -> IngesterClass:
        if not (isinstance(cls, type) and issubclass(cls, Ingester)):
            raise TypeError(
                f"@ingester({name!r}) is applied to {cls!r}, which is not a subclass of "
                "osa_sdk.Ingester"
            )
        missing = sorted(cls.__abstractmethods__)
        if missing:
            raise TypeError(
                f"@ingester({name!r}): {cls.__qualname__} does not implement {', '.join(missing)}"
            )
        cls.name = name
        cls.max_file_mb = max_file_mb
        return cls

    return decorate


# Hooks

HookResult = dict[str, Any] | list[dict[str, Any]] | None
HookFunction = Callable[..., HookResult]


class Hook:
    """A hook function and its name. Calling the hook calls the function, unchanged.

    The function takes a HookRecord (and, if it has a parameter named `config`, the
    hook's configuration) and returns None (passed, no features), a dict (one feature
    row) or a list of dicts (many rows); it raises Reject(reason) to reject the record.
    Features over the engine's caps (osa_sdk.contract: MAX_FEATURE_ROWS_PER_RECORD rows,
    MAX_OUTCOME_LINE_BYTES as JSON) error the record; larger results belong in a file.
    """

    def __init__(self, fn: HookFunction, name: str) -> None:
        if not callable(fn):
            raise TypeError(f"hook {name!r}: {fn!r} is not callable")
        if not name:
            raise ValueError(f"hook {fn!r} needs a non-empty name")
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name
        self.accepts_config = "config" in inspect.signature(fn).parameters

    def __call__(self, record: HookRecord, *args: Any, **kwargs: Any) -> HookResult:
        return self.fn(record, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Hook({self.name!r}, {self.fn!r})"


@overload
def hook(fn: HookFunction, /) -> Hook: ...
@overload
def hook(*, name: str | None = None) -> Callable[[HookFunction], Hook]: ...
def hook(
    fn: HookFunction | None = None, /, *, name: str | None = None
) -> Hook | Callable[[HookFunction], Hook]:
    """Make a function a hook: ``@hook`` (named after the function) or ``@hook(name="...")``."""
    if fn is not None:
        return Hook(fn, getattr(fn, "__name__", ""))

    def named(f: HookFunction) -> Hook:
        return Hook(f, name or str(getattr(f, "__name__", "")))

    return named
