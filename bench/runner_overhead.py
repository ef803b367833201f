"""What the runners add to starting a hook, against a bare subprocess.run.

    .venv/bin/python bench/runner_overhead.py [--runs 30] [--command python|true|sdk-hook]
                                              [--no-docker]

The local runner is timed with each OSA_HOOK_MEMORY_LIMITS mode (a cgroup of the host's
hierarchy, v1 or v2, where one can be had; RLIMIT_AS; none) unsandboxed and, where the
sandbox can run (bubblewrap: as root,
or rootless as an ordinary user), sandboxed: the cgroup's and the sandbox's own costs per
attempt are the differences. Figures of different machines (this host's cgroup v1 and the
cgroup v2 guest of `scripts/cgroup2_vm.py`, which emulates its CPU about 17 times slower)
compare only as ratios to the bare run measured in the same place and run. The same
command also runs in a sandboxed container of the pdb hook image (DockerRunner) when a
Docker engine answers and the image is built (`make images`); --no-docker skips it.

`--command sdk-hook` starts what every hook attempt starts, `python -m osa_sdk hook` with
the uniprot convention's validate_sequence over no records: the interpreter, the SDK and the
hook's imports, the fixed cost of one attempt.

Runs the same command with each launcher in turn, round after round (so that drift of the
machine hits all of them alike), and prints the median, the range and the ratio to the bare run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from osa_sdk.contract import CONFIG_FILE, ENV_FILES, ENV_HOOK_NAME, ENV_IN, ENV_OUT, RECORDS_FILE

from osa_dagster.conventions.pdb import HOOK_IMAGE
from osa_dagster.engine import Invocation, LocalRunner, MemoryLimitsUnavailable, Runner
from osa_dagster.engine.cgroup import attempt_cgroups
from osa_dagster.engine.runners.docker import DockerRunner
from osa_dagster.engine.runners.sandbox import SandboxUnavailable
from osa_dagster.engine.spec import sdk_hook_command
from osa_dagster.settings import MemoryLimits, Settings

COMMANDS = {
    "python": [sys.executable, "-c", "pass"],
    "true": ["true"],
    "sdk-hook": list(sdk_hook_command("osa_dagster.conventions.uniprot.hooks:validate_sequence")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--command", choices=sorted(COMMANDS), default="python")
    parser.add_argument("--no-docker", action="store_true", help="do not time DockerRunner")
    args = parser.parse_args()
    command = COMMANDS[args.command]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folder in ("in", "out", "files"):
            (root / folder).mkdir()
        # The hook's contract, for sdk-hook: no records, no configuration.
        (root / "in" / RECORDS_FILE).touch()
        (root / "in" / CONFIG_FILE).write_text("{}")
        contract = {
            ENV_IN: str(root / "in"),
            ENV_OUT: str(root / "out"),
            ENV_FILES: str(root / "files"),
            ENV_HOOK_NAME: "validate_sequence",
        }
        invocation = Invocation(
            command=command,
            env=contract,
            in_dir=root / "in",
            out_dir=root / "out",
            files_root=root / "files",
            memory_limit_mb=512,
            timeout_s=60,
            log_path=root / "hook.log",
            image=HOOK_IMAGE.name,
        )
        launchers: dict[str, Callable[[], None]] = {
            "subprocess.run": lambda: subprocess.run(
                command, check=True, env={**os.environ, **contract}, stderr=subprocess.DEVNULL
            )
        }
        modes: list[MemoryLimits] = ["cgroup", "rlimit", "off"]
        try:
            hierarchy = f"cgroup v{attempt_cgroups().version}"
        except MemoryLimitsUnavailable as missing:
            hierarchy = f"no cgroup ({missing})"
            modes.remove("cgroup")
        for mode in modes:
            runner = LocalRunner.from_settings(Settings.from_env(), mode, sandbox="off")
            launchers[f"LocalRunner({mode})"] = _runner_launcher(runner, invocation)
        try:
            sandboxed = LocalRunner.from_settings(Settings.from_env(), modes[0], sandbox="on")
        except SandboxUnavailable as reason:
            print(f"sandboxed LocalRunner not timed: {reason}")
        else:
            launchers[f"LocalRunner({modes[0]}, sandbox)"] = _runner_launcher(sandboxed, invocation)
        if not args.no_docker and _docker_image_ready():
            launchers["DockerRunner"] = _runner_launcher(DockerRunner(), invocation)

        times: dict[str, list[float]] = {name: [] for name in launchers}
        for launch in launchers.values():
            _empty(root / "out")
            launch()  # warm-up: imports, page cache
        for _ in range(args.runs):
            for name, launch in launchers.items():
                _empty(root / "out")  # what sdk-hook wrote, as another user maybe
                started = time.perf_counter()
                launch()
                times[name].append(time.perf_counter() - started)

    bare = statistics.median(times["subprocess.run"])
    print(f"{args.command!r} command, {args.runs} runs each; memory limits: {hierarchy}")
    print(f"{'launcher':<30} {'median ms':>10} {'min-max ms':>16} {'ratio':>6}")
    for name, samples in times.items():
        median = statistics.median(samples)
        spread = f"{min(samples) * 1e3:.2f}-{max(samples) * 1e3:.2f}"
        print(f"{name:<30} {median * 1e3:>10.2f} {spread:>16} {median / bare:>6.2f}")


def _empty(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def _docker_image_ready() -> bool:
    import docker

    try:
        docker.from_env().images.get(HOOK_IMAGE.name)
    except docker.errors.DockerException:
        print("no Docker engine or no pdb hook image: DockerRunner not timed")
        return False
    return True


def _runner_launcher(runner: Runner, invocation: Invocation) -> Callable[[], None]:
    def launch() -> None:
        exit_ = runner.start(invocation).wait(60)
        assert exit_ is not None and exit_.returncode == 0, exit_

    return launch


if __name__ == "__main__":
    main()
