"""One hook over one staged batch, in one attempt of the local runner: a workflow job.

    .venv/bin/python bench/hook_attempt.py CONVENTION HOOK RAW_BATCH_FOLDER WORK_FOLDER

What another workflow manager's job would run to give a hook the isolation the archive
gives it (bench/swissprot_scale.py runs it from Snakemake): the batch's records
(`RAW_BATCH_FOLDER/records.jsonl`, its files beside them) go to the hook's command under
the same real cgroup memory limit (the hook's base rung) and the same sandbox, through the
project's LocalRunner, with no checkpoint, no memory ladder and no orchestrator. Exits 0
when every record got an outcome, else 1 with one line saying why.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from osa_sdk.contract import (
    CONFIG_FILE,
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
    FILES_DIR,
    OUTPUT_FILES,
    RECORDS_FILE,
)
from osa_sdk.types import HookRecord, IngesterRecord

from osa_dagster.conventions.registry import load_conventions
from osa_dagster.engine import Invocation, LocalRunner
from osa_dagster.settings import Settings


def main(convention_name: str, hook_name: str, raw: Path, work: Path) -> int:
    settings = Settings.from_env()
    convention = load_conventions(settings)[convention_name]
    (spec,) = [h for h in convention.hooks if h.name == hook_name]
    in_dir, out_dir = work / "in", work / "out"
    in_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    records = 0
    with (raw / RECORDS_FILE).open() as lines, (in_dir / RECORDS_FILE).open("w") as hook_input:
        for line in lines:
            record = HookRecord.from_ingested(IngesterRecord.model_validate_json(line))
            hook_input.write(record.model_dump_json() + "\n")
            records += 1
    (in_dir / CONFIG_FILE).write_text(json.dumps(spec.config))
    files_root = raw / FILES_DIR
    memory_mb = spec.memory.base_mb
    invocation = Invocation(
        command=spec.command,
        env={
            ENV_IN: str(in_dir),
            ENV_OUT: str(out_dir),
            ENV_FILES: str(files_root),
            ENV_HOOK_NAME: spec.name,
            ENV_MEMORY_LIMIT_MB: str(memory_mb),
        },
        in_dir=in_dir,
        out_dir=out_dir,
        files_root=files_root,
        memory_limit_mb=memory_mb,
        timeout_s=spec.timeout_s * records,
        log_path=work / "hook.log",
        image=spec.image,
        network=spec.network,
    )
    runner = LocalRunner.from_settings(settings, "cgroup", sandbox="on")
    exit_ = runner.start(invocation).wait(invocation.timeout_s)
    outputs = [out_dir / name for name in OUTPUT_FILES if (out_dir / name).exists()]
    outcomes = sum(sum(1 for _ in output.open()) for output in outputs)
    if exit_ is None or exit_.returncode != 0 or outcomes != records:
        print(f"{hook_name} on {raw}: {exit_}, {outcomes} of {records} outcomes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(
        main(sys.argv[1], sys.argv[2], Path(sys.argv[3]).resolve(), Path(sys.argv[4]).resolve())
    )
