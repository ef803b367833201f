"""Command line: ``python -m osa_sdk hook pkg.module:fn`` and ``... ingest pkg.module:Class``.

Exit codes: 0 done; EXIT_CONTRACT_ERROR (2) the setup is wrong (missing env var,
unimportable target, malformed input line); 1 the ingester broke the rules of fetch or
crashed; EXIT_MEMORY_ERROR (99) a hook ran out of memory (see runtime.HookOutOfMemory).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from osa_sdk.authoring import Ingester
from osa_sdk.contract import ENV_FILES, ENV_HOOK_NAME, ENV_IN, ENV_OUT, EXIT_CONTRACT_ERROR
from osa_sdk.runtime import ContractError, IngestError, read_jsonl, run_hook, run_ingest
from osa_sdk.types import RecordRef


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="osa_sdk: %(message)s")
    try:
        if args.command == "hook":
            return _hook(args.target)
        return _ingest(args.target, args.refs, args.out, args.config)
    except ContractError as exc:
        print(f"osa_sdk: {exc}", file=sys.stderr)
        return EXIT_CONTRACT_ERROR
    except IngestError as exc:
        print(f"osa_sdk: ingest failed: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m osa_sdk", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    hook = commands.add_parser(
        "hook",
        help="run a hook over the batch in $OSA_IN",
        description=f"Run a hook under the container contract; reads {ENV_IN}, {ENV_OUT}, "
        f"{ENV_FILES} and {ENV_HOOK_NAME} from the environment.",
    )
    hook.add_argument("target", help="the hook, as pkg.module:function")
    ingest = commands.add_parser("ingest", help="fetch a list of refs into a raw batch folder")
    ingest.add_argument("target", help="the Ingester subclass, as pkg.module:Class")
    ingest.add_argument("--refs", type=Path, required=True, help="RecordRef JSON lines")
    ingest.add_argument("--out", type=Path, required=True, help="an empty output folder")
    ingest.add_argument("--config", default="{}", help="the ingester's config, a JSON object")
    return parser


def _hook(target: str) -> int:
    fn = _load(target)
    if not callable(fn):
        raise ContractError(f"hook target {target!r} is {type(fn).__name__}, not a function")
    env = {name: _env(name) for name in (ENV_IN, ENV_OUT, ENV_FILES, ENV_HOOK_NAME)}
    run_hook(
        fn,
        in_dir=Path(env[ENV_IN]),
        out_dir=Path(env[ENV_OUT]),
        files_root=Path(env[ENV_FILES]),
        hook_name=env[ENV_HOOK_NAME],
    )
    return 0


def _ingest(target: str, refs_path: Path, out_dir: Path, config_json: str) -> int:
    cls = _load(target)
    if not (isinstance(cls, type) and issubclass(cls, Ingester)):
        raise ContractError(f"ingest target {target!r} is not a subclass of osa_sdk.Ingester")
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise ContractError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ContractError(f"--config must be a JSON object, not {type(config).__name__}")
    refs = read_jsonl(refs_path, RecordRef)
    report = run_ingest(cls(**config), refs, out_dir)
    logging.getLogger("osa_sdk").info(
        "ingest %s: %d records, %d skipped (oversize), %d failed, %d missing",
        target,
        report.records,
        len(report.skipped_oversize),
        len(report.failed),
        len(report.missing),
    )
    return 0


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ContractError(f"environment variable {name} is not set (see docs/contract.md)")
    return value


def _load(target: str) -> Any:
    module_name, sep, attribute = target.partition(":")
    if not (sep and module_name and attribute):
        raise ContractError(f"target {target!r} must look like pkg.module:name")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ContractError(
            f"cannot import module {module_name!r} of target {target!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ContractError(f"target {target!r}: {module_name} has no {attribute}") from None
    return obj


if __name__ == "__main__":
    sys.exit(main())
