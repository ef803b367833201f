#!/bin/sh
# The whole demo on a cgroup v2 kernel as an unprivileged user in a delegated cgroup with
# hooks sandboxed (rootless bubblewrap), run inside the virtual machine of
# scripts/cgroup2_vm.py (make demo-cgroup2; 5 to 20 minutes under emulation, so not in CI).
# The demo's data lives in a scratch folder of the guest's throw-away /. Afterwards it prints
# every attempt of the hooks that were OOM-killed, and the kernel's own oom_kill count of
# the delegated cgroup (memory.events counts its whole subtree); it fails if the demo did,
# or if the kernel killed nothing, which would mean no limit was ever reached.
set -u
python=$(pwd)/.venv/bin/python
user=65534
export PYTHONDONTWRITEBYTECODE=1 OSA_HOOK_SANDBOX=on OSA_HOOK_MEMORY_LIMITS=cgroup
. scripts/cgroup2_delegate.sh

scratch=$(mktemp -d /tmp/osa-demo.XXXXXX)
export DAGSTER_HOME="$scratch/dagster" OSA_DATA_DIR="$scratch/data"
mkdir "$DAGSTER_HOME"
chown -R "$user:$user" "$scratch"
delegated=$(delegate_cgroup "$user" "$python")
oom_kills() { sed -n 's/^oom_kill //p' "$delegated/memory.events"; }
kills_before=$(oom_kills)

echo "== cgroup v2 demo: osa demo as uid $user, in a cgroup delegated to it, hooks sandboxed"
run_delegated "$user" "$delegated" "$python" -m osa_dagster.cli demo
demo=$?
kills=$(($(oom_kills) - kills_before))

echo "== attempts of the hooks that were OOM-killed"
"$python" - "$OSA_DATA_DIR" <<'PY'
import sys
from pathlib import Path

from osa_dagster.engine.checkpoint import Checkpoint

for path in sorted(Path(sys.argv[1]).rglob("checkpoint.json")):
    checkpoint = Checkpoint.model_validate_json(path.read_text())
    if checkpoint.oom_attempts():
        print(f"{checkpoint.hook} ({path.parent.parent.parent.name}):")
        for a in checkpoint.attempts:
            print(
                f"  attempt {a.number}: limit {a.memory_limit_mb} MB ({a.limit_mode}), "
                f"exit {a.returncode}, OOM-killed {a.oom_killed}, peak {a.peak_memory_mb} MB, "
                f"first unfinished {a.first_unfinished}"
            )
PY
echo "== cgroup v2 demo: exit $demo, the kernel's oom_kill count of $delegated rose by $kills"
[ "$demo" = 0 ] && [ "$kills" -gt 0 ]
