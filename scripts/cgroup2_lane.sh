#!/bin/sh
# The cgroup v2 lane, run inside the virtual machine of scripts/cgroup2_vm.py (make
# test-cgroup2): the real-kernel tests (marker cgroup_kernel) of the runner and of its
# sandbox, as root in the root cgroup, then as an unprivileged user in a cgroup delegated to
# it (hooks then sandboxed rootless). Both runs always run; the lane fails if either does.
set -u
python=$(pwd)/.venv/bin/python  # by absolute path: every process start costs in the guest
user=65534
tests="tests/engine/test_cgroup_kernel.py tests/engine/test_runners.py tests/engine/test_sandbox.py"
pytest="$python -m pytest -p no:cacheprovider -q -rs --durations=5 -m cgroup_kernel $tests"
export PYTHONDONTWRITEBYTECODE=1
. scripts/cgroup2_delegate.sh

echo "== cgroup v2 lane: as root, in the root cgroup"
$pytest
as_root=$?

echo "== cgroup v2 lane: as uid $user, in a cgroup delegated to it"
delegated=$(delegate_cgroup "$user" "$python")
run_delegated "$user" "$delegated" $pytest
as_user=$?

echo "== cgroup v2 lane: root $as_root, uid $user $as_user"
[ "$as_root" = 0 ] && [ "$as_user" = 0 ]
