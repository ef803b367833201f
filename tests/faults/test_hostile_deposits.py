"""Hostile deposits: a deposit may only ever have what was deposited read from it.

Symlinks (to /etc/shadow, to /proc/self/environ, to a folder of credentials), a linked
files/, a FIFO, a device and a linked deposit.json are refused with the reason in
result.json, and nothing they point to is opened; a 400 MB deposit.json is refused unread;
a folder whose name cannot be a deposit's gets a result.json saying so. An honest deposit
beside them passes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from osa_sdk.authoring import Ingester
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.deposits import (
    FILES_DIR,
    MAX_DEPOSIT_FILES,
    RESULT_FILE,
    ConventionFolderError,
    pending_deposits,
    read_result,
    refuse_misnamed_deposits,
    validate_deposit,
    write_deposit,
)
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import LocalRunner
from osa_dagster.engine.runners.base import AttemptMarker, Invocation, RunningAttempt
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command
from osa_dagster.regular_files import copy_data
from osa_dagster.settings import Settings
from osa_dagster.storage.store import FileSystemStore
from tests.fixtures.hostile_convention import PeakGrowth
from tests.fixtures.toy_convention import ToyIngester

from .conftest import REPO

CONVENTION = "deposited"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileSystemStore:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return FileSystemStore(tmp_path / "deposits")


def convention(ingester: type[Ingester] = ToyIngester) -> Convention:
    return Convention(
        name=CONVENTION,
        ingester=ingester,
        hooks=(
            HookSpec(
                name="validator",
                command=sdk_hook_command("tests.fixtures.hostile_hooks:validator"),
                memory=MemoryPolicy(base_mb=256, cap_mb=256),
                timeout_s=60,
            ),
        ),
    )


def folder(store: FileSystemStore, deposit: str) -> Path:
    return store.root / CONVENTION / deposit


def credentials(tmp_path: Path) -> Path:
    secrets = tmp_path / "home" / ".aws"
    secrets.mkdir(parents=True)
    (secrets / "credentials").write_text("aws_secret_access_key = not-for-depositors\n")
    return secrets


# name -> (what to put in files/ besides a good file, the reason expected)
HOSTILE_FILES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "shadow": (
        lambda files, _: (files / "shadow").symlink_to("/etc/shadow"),
        "files/shadow is a symlink: deposit regular files only",
    ),
    "environ": (
        lambda files, _: (files / "environ").symlink_to("/proc/self/environ"),
        "files/environ is a symlink: deposit regular files only",
    ),
    "aws-folder": (
        lambda files, tmp: (files / "aws").symlink_to(credentials(tmp)),
        "files/aws is a symlink: deposit regular files only",
    ),
    "fifo": (
        lambda files, _: os.mkfifo(files / "pipe"),
        "files/pipe is a FIFO: deposit regular files only",
    ),
    "device": (
        lambda files, _: os.mknod(files / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "files/null is a character device: deposit regular files only",
    ),
    "folder": (
        lambda files, _: (files / "sub").mkdir(),
        "files/sub is a folder: deposit regular files only",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_FILES)
def test_a_file_that_is_not_a_regular_file_is_refused_unopened(
    store: FileSystemStore, tmp_path: Path, case: str
) -> None:
    make, reason = HOSTILE_FILES[case]
    write_deposit(store, CONVENTION, case, {"good.txt": b"deposited"})
    make(folder(store, case) / FILES_DIR, tmp_path)

    result = validate_deposit(
        convention(), store, case, LocalRunner.from_settings(Settings.from_env())
    )

    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        f"malformed deposit: {reason}",
    )
    written = (folder(store, case) / RESULT_FILE).read_text()
    assert "not-for-depositors" not in written
    assert Path("/etc/shadow").read_text().splitlines()[0] not in written


def test_a_linked_files_folder_is_refused(store: FileSystemStore, tmp_path: Path) -> None:
    write_deposit(store, CONVENTION, "linked", {})
    (folder(store, "linked") / FILES_DIR).symlink_to(credentials(tmp_path))

    result = validate_deposit(
        convention(), store, "linked", LocalRunner.from_settings(Settings.from_env())
    )

    assert result.reason == "malformed deposit: files/ is a symlink: deposit the files themselves"
    assert "not-for-depositors" not in (folder(store, "linked") / RESULT_FILE).read_text()


def test_a_linked_deposit_json_is_refused(store: FileSystemStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "request.json"
    elsewhere.write_text(json.dumps({"source_id": "elsewhere"}))
    write_deposit(store, CONVENTION, "linked-request", {"good.txt": b"deposited"})
    (folder(store, "linked-request") / "deposit.json").unlink()
    (folder(store, "linked-request") / "deposit.json").symlink_to(elsewhere)

    result = validate_deposit(
        convention(), store, "linked-request", LocalRunner.from_settings(Settings.from_env())
    )

    assert result.reason == "malformed deposit: deposit.json is a symlink, not a regular file"


def test_a_huge_deposit_json_is_refused_unread(store: FileSystemStore) -> None:
    write_deposit(store, CONVENTION, "huge", {"good.txt": b"deposited"})
    os.truncate(folder(store, "huge") / "deposit.json", 400 * BYTES_PER_MB)  # sparse: no disk used

    with PeakGrowth() as growth:
        result = validate_deposit(
            convention(), store, "huge", LocalRunner.from_settings(Settings.from_env())
        )

    assert result.reason == (
        "malformed deposit: deposit.json is 400.0 MB, over the 4 MB it may be: put data in files/"
    )
    assert growth.mb < 50, f"the validator's memory grew by {growth.mb:.0f} MB"


def test_a_folder_the_sensor_cannot_take_gets_a_result_saying_why(
    store: FileSystemStore,
) -> None:
    names = ["with space", "ünïcødé", ".hidden", "-leading-dash"]
    for name in [*names, "honest"]:
        write_deposit(store, CONVENTION, name, {"good.txt": b"deposited"})

    assert refuse_misnamed_deposits(store, CONVENTION) == sorted(names)
    assert pending_deposits(store, CONVENTION) == ["honest"]
    for name in names:
        result = read_result(store, CONVENTION, name)
        assert result.status is OutcomeStatus.REJECTED
        assert result.reason is not None
        assert result.reason.startswith(f"malformed deposit: the folder name {name!r} cannot")
    # Refused once: a second tick finds nothing more to say.
    assert refuse_misnamed_deposits(store, CONVENTION) == []
    honest = validate_deposit(
        convention(), store, "honest", LocalRunner.from_settings(Settings.from_env())
    )
    assert honest.status is OutcomeStatus.PASSED, honest.reason


def outside_the_store(tmp_path: Path) -> Path:
    """A folder a depositor would like the orchestrator to write into: it holds a deposit of
    its own, so that a validator following a link would find something to validate."""
    target = tmp_path / "outside"
    (target / FILES_DIR).mkdir(parents=True)
    (target / FILES_DIR / "good.txt").write_bytes(b"deposited")
    (target / "deposit.json").write_text("{}")
    return target


def tree(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry below `folder`: its mode and, for a file, its content."""
    return {
        str(path.relative_to(folder)): (
            path.lstat().st_mode,
            path.read_bytes() if path.is_file() and not path.is_symlink() else None,
        )
        for path in sorted(folder.rglob("*"))
    }


def test_a_linked_deposit_folder_is_neither_read_nor_written_through(
    store: FileSystemStore, tmp_path: Path
) -> None:
    target = outside_the_store(tmp_path)
    before = tree(target)
    (store.root / CONVENTION).mkdir(parents=True)
    folder(store, "linked").symlink_to(target)

    result = validate_deposit(
        convention(), store, "linked", LocalRunner.from_settings(Settings.from_env())
    )

    assert tree(target) == before  # no result.json where the link points
    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        f"malformed deposit: {CONVENTION}/linked is a symlink: deposit a folder, not a link to one",
    )
    assert folder(store, "linked").is_symlink()


class SwappingRunner:
    """The local runner, but the deposit's folder is swapped the moment its first hook
    starts: after the deposit was read, before its result is written, as a depositor racing
    the validator would do it."""

    def __init__(self, swap: Callable[[], None]) -> None:
        self.runner = LocalRunner.from_settings(Settings.from_env())
        self.swap: Callable[[], None] | None = swap

    def start(self, inv: Invocation) -> RunningAttempt:
        if self.swap is not None:
            self.swap()
            self.swap = None
        return self.runner.start(inv)

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        self.runner.kill_leftovers(marker)


def test_a_deposit_folder_swapped_for_a_symlink_while_validated_is_not_written_through(
    store: FileSystemStore, tmp_path: Path
) -> None:
    target = outside_the_store(tmp_path)
    before = tree(target)
    write_deposit(store, CONVENTION, "racer", {"good.txt": b"deposited"})
    racer, aside = folder(store, "racer"), folder(store, "racer.aside")

    def swap() -> None:
        racer.rename(aside)
        racer.symlink_to(target)

    result = validate_deposit(convention(), store, "racer", SwappingRunner(swap))

    assert tree(target) == before
    assert (result.status, result.reason) == (
        OutcomeStatus.ERRORED,
        f"the deposit's folder changed while it was validated ({CONVENTION}/racer is a "
        "symlink): no result.json was written",
    )
    assert not (aside / RESULT_FILE).exists()
    # Nothing was written anywhere but the deposits store itself: only the test's folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deposits", "outside"]


def test_a_deposit_folder_swapped_for_another_folder_is_told_so(store: FileSystemStore) -> None:
    write_deposit(store, CONVENTION, "replaced", {"good.txt": b"deposited"})
    replaced = folder(store, "replaced")

    def swap() -> None:
        replaced.rename(folder(store, "replaced.aside"))
        (replaced / FILES_DIR).mkdir(parents=True)
        (replaced / FILES_DIR / "other.txt").write_bytes(b"never validated")

    result = validate_deposit(convention(), store, "replaced", SwappingRunner(swap))

    assert (result.status, result.reason) == (
        OutcomeStatus.ERRORED,
        "the deposit's folder was replaced by another while it was validated: "
        "deposit again under a new name",
    )
    assert read_result(store, CONVENTION, "replaced") == result
    assert not (folder(store, "replaced.aside") / RESULT_FILE).exists()


def test_result_json_is_written_in_place_of_a_planted_symlink(
    store: FileSystemStore, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text("the depositor's")
    write_deposit(store, CONVENTION, "planted", {"good.txt": b"deposited"})
    (folder(store, "planted") / RESULT_FILE).symlink_to(target)

    result = validate_deposit(
        convention(), store, "planted", LocalRunner.from_settings(Settings.from_env())
    )

    assert result.status is OutcomeStatus.PASSED, result.reason
    assert target.read_text() == "the depositor's"
    written = folder(store, "planted") / RESULT_FILE
    assert not written.is_symlink()
    assert stat.S_IMODE(written.stat().st_mode) & 0o044 == 0o044  # the depositor reads it


class Uncapped(ToyIngester):
    """The toy convention without a cap of its own on a file's size."""

    max_file_mb = None


def written_bytes() -> int:
    """What this process has passed to write(2), sendfile(2) and the like so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no wchar")


def test_a_sparse_file_over_the_cap_is_refused_by_its_apparent_size(
    store: FileSystemStore,
) -> None:
    write_deposit(store, CONVENTION, "sparse", {"good.txt": b"deposited"})
    big = folder(store, "sparse") / FILES_DIR / "big.bin"
    big.touch()
    os.truncate(big, 1024 * BYTES_PER_MB)  # 1 GB that takes no disk
    start = written_bytes()

    result = validate_deposit(
        convention(), store, "sparse", LocalRunner.from_settings(Settings.from_env())
    )

    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        "malformed deposit: files/big.bin is 1024.0 MB, over the 0.05 MB a deposited file of "
        "this convention may be",
    )
    assert written_bytes() - start < BYTES_PER_MB  # refused before a byte of it was copied


def test_files_under_their_own_cap_are_refused_over_the_deposit_s(
    store: FileSystemStore,
) -> None:
    third = BYTES_PER_MB // 3
    write_deposit(store, CONVENTION, "heavy", {n: b"x" * third for n in ("a", "b", "c", "d")})

    result = validate_deposit(
        convention(ingester=Uncapped),
        store,
        "heavy",
        LocalRunner.from_settings(Settings.from_env()),
        max_mb=1,
    )

    assert result.reason == (
        "malformed deposit: the files reach 1.3 MB with files/d, over the 1 MB a deposit may hold"
    )


def test_a_sparse_file_under_the_cap_is_copied_with_its_holes(store: FileSystemStore) -> None:
    write_deposit(store, CONVENTION, "holes", {})
    files = folder(store, "holes") / FILES_DIR
    files.mkdir()
    with (files / "holes.bin").open("wb") as sparse:
        sparse.write(b"start")
        sparse.seek(300 * BYTES_PER_MB)
        sparse.write(b"end")
    start = written_bytes()

    result = validate_deposit(
        convention(ingester=Uncapped),
        store,
        "holes",
        LocalRunner.from_settings(Settings.from_env()),
        max_mb=400,
    )

    assert result.status is OutcomeStatus.PASSED, result.reason
    # The hook saw a record of 300 MB; far less than that was written to stage it.
    assert written_bytes() - start < 16 * BYTES_PER_MB


def test_a_copy_keeps_content_and_holes(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    with source.open("wb") as sparse:
        sparse.write(b"start")
        sparse.seek(300 * BYTES_PER_MB)
        sparse.write(b"end")
    size = source.stat().st_size
    with source.open("rb") as reading, target.open("wb") as writing:
        assert copy_data(reading.fileno(), writing.fileno(), size)

    assert target.stat().st_size == size
    assert target.stat().st_blocks * 512 < BYTES_PER_MB
    with target.open("rb") as copied:
        assert copied.read(5) == b"start"
        copied.seek(size - 3)
        assert copied.read() == b"end"
        copied.seek(BYTES_PER_MB)
        assert copied.read(4096) == bytes(4096)


def test_a_file_name_that_is_not_utf8_gets_a_result_and_is_done(store: FileSystemStore) -> None:
    write_deposit(store, CONVENTION, "latin1", {"good.txt": b"deposited"})
    files = os.fsencode(folder(store, "latin1") / FILES_DIR)
    Path(os.fsdecode(files + b"/r\xe9sum\xe9.txt")).write_bytes(b"deposited")
    assert pending_deposits(store, CONVENTION) == ["latin1"]

    result = validate_deposit(
        convention(), store, "latin1", LocalRunner.from_settings(Settings.from_env())
    )

    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        "malformed deposit: file name 'r\\udce9sum\\udce9.txt' is not valid UTF-8: name files "
        "in UTF-8",
    )
    assert read_result(store, CONVENTION, "latin1") == result
    assert pending_deposits(store, CONVENTION) == []  # finished: not tried again


def test_a_folder_name_that_is_not_utf8_gets_a_result(store: FileSystemStore) -> None:
    name = os.fsdecode(b"d\xe9p\xf4t")
    write_deposit(store, CONVENTION, name, {"good.txt": b"deposited"})

    assert refuse_misnamed_deposits(store, CONVENTION) == [name]

    result = read_result(store, CONVENTION, name)
    assert result.deposit == "d\\xe9p\\xf4t"
    assert result.reason is not None
    assert result.reason.startswith(
        "malformed deposit: the folder name 'd\\udce9p\\udcf4t' cannot name a deposit"
    )
    assert refuse_misnamed_deposits(store, CONVENTION) == []


@pytest.mark.parametrize(
    ("request_text", "reason"),
    [
        (
            '{"metadata": {"resolution": NaN}}',
            "deposit.json is not strict JSON: NaN (not a finite number) at metadata.resolution",
        ),
        (
            '{"metadata": {"sizes": [1, 1e400]}}',
            "deposit.json is not strict JSON: 1e400 (not a finite number) at metadata.sizes[1]",
        ),
        (
            '{"metadata": {"range": {"low": -Infinity}}}',
            "deposit.json is not strict JSON: -Infinity (not a finite number) at "
            "metadata.range.low",
        ),
        (
            '{"metadata": {"name": "\\ud800"}}',
            "deposit.json is not strict JSON: a lone surrogate escape (not Unicode text) at "
            "metadata.name",
        ),
        (
            '{"metadata": {"nested": ' + "[" * 100_000 + "]" * 100_000 + "}}",
            "deposit.json is not valid JSON (maximum recursion depth exceeded while decoding a "
            "JSON array from a unicode string)",
        ),
    ],
    ids=["nan", "overflow", "infinity", "surrogate", "nesting"],
)
def test_metadata_that_is_not_strict_json_is_refused(
    store: FileSystemStore, request_text: str, reason: str
) -> None:
    write_deposit(store, CONVENTION, "loose", {"good.txt": b"deposited"}, request_text)

    result = validate_deposit(
        convention(), store, "loose", LocalRunner.from_settings(Settings.from_env())
    )

    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        f"malformed deposit: {reason}",
    )
    assert read_result(store, CONVENTION, "loose") == result


@contextmanager
def nested_folders(top: Path, depth: int) -> Iterator[None]:
    """`depth` folders, each in the last, under `top`; removed afterwards by rm, which
    (unlike shutil.rmtree and so pytest's cleanup) does not recurse that deep."""
    current = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("a", dir_fd=current)
        child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = child
    os.close(current)
    try:
        yield
    finally:
        subprocess.run(["rm", "-rf", str(top / "a")], check=True)


def test_the_sensor_looks_one_level_into_each_deposit(
    store: FileSystemStore, tmp_path: Path
) -> None:
    """Listing every file of every deposit failed (RecursionError) on every tick once one
    deposit held folders nested 1100 deep: no deposit was validated any more."""
    write_deposit(store, CONVENTION, "honest", {"good.txt": b"deposited"})
    write_deposit(store, CONVENTION, "deep", {})
    (folder(store, "deep") / FILES_DIR).mkdir()
    write_deposit(store, CONVENTION, "fifo-request", {"good.txt": b"deposited"})
    (folder(store, "fifo-request") / "deposit.json").unlink()
    os.mkfifo(folder(store, "fifo-request") / "deposit.json")
    folder(store, "linked").symlink_to(outside_the_store(tmp_path))

    with nested_folders(folder(store, "deep") / FILES_DIR, 1500):
        assert pending_deposits(store, CONVENTION) == ["deep", "fifo-request", "honest"]
        deep = validate_deposit(
            convention(), store, "deep", LocalRunner.from_settings(Settings.from_env())
        )

    assert deep.reason == "malformed deposit: files/a is a folder: deposit regular files only"
    fifo = validate_deposit(
        convention(), store, "fifo-request", LocalRunner.from_settings(Settings.from_env())
    )
    assert fifo.reason == "malformed deposit: deposit.json is a FIFO, not a regular file"
    assert pending_deposits(store, CONVENTION) == ["honest"]


def test_a_linked_convention_folder_is_refused_loudly(
    store: FileSystemStore, tmp_path: Path
) -> None:
    write_deposit(FileSystemStore(tmp_path), "elsewhere", "taken", {"good.txt": b"deposited"})
    target = tmp_path / "elsewhere"
    store.root.mkdir()
    (store.root / CONVENTION).symlink_to(target)

    with pytest.raises(ConventionFolderError, match=f"{CONVENTION} is a symlink: deposits are"):
        pending_deposits(store, CONVENTION)
    result = validate_deposit(
        convention(), store, "taken", LocalRunner.from_settings(Settings.from_env())
    )

    assert result.reason == (
        f"malformed deposit: {CONVENTION} is a symlink: deposit a folder, not a link to one"
    )
    assert not (target / "taken" / RESULT_FILE).exists()


def test_a_deposit_of_too_many_files_is_refused_before_they_are_listed(
    store: FileSystemStore,
) -> None:
    write_deposit(store, CONVENTION, "many", {"good.txt": b"deposited"})
    files = os.open(folder(store, "many") / FILES_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for number in range(MAX_DEPOSIT_FILES):
            os.close(os.open(f"empty-{number}", os.O_CREAT | os.O_WRONLY, dir_fd=files))
    finally:
        os.close(files)

    result = validate_deposit(
        convention(), store, "many", LocalRunner.from_settings(Settings.from_env())
    )

    assert result.reason == (
        f"malformed deposit: files/ holds more than {MAX_DEPOSIT_FILES} files, the most a "
        "deposit may hold"
    )
