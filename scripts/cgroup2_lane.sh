#!/bin/sh
# The cgroup v2 lane, run inside the virtual machine of scripts/cgroup2_vm.py (make
# test-cgroup2): the runner's real-kernel tests (marker cgroup_kernel) as root in the root
# cgroup, then as an unprivileged user in a cgroup delegated to it the way systemd's
# Delegate=yes does it (the folder and its cgroup.procs, cgroup.subtree_control and
# cgroup.threads owned by that user). Both runs always run; the lane fails if either does.
set -u
python=$(pwd)/.venv/bin/python  # by absolute path: every process start costs in the guest
user=65534
tests="tests/engine/test_cgroup_kernel.py tests/engine/test_runners.py"
pytest="$python -m pytest -p no:cacheprovider -q --durations=5 -m cgroup_kernel $tests"
export PYTHONDONTWRITEBYTECODE=1

echo "== cgroup v2 lane: as root, in the root cgroup"
$pytest
as_root=$?

echo "== cgroup v2 lane: as uid $user, in a cgroup delegated to it"
# The interpreter may live in a home only root may enter (pyenv under /root): let the user
# through the folders above it and above the repository. The guest's / is an overlay, so
# this changes nothing on the host.
for path in "$(readlink -f "$python")" "$(pwd)"; do
    while [ "$path" != / ]; do
        path=$(dirname "$path")
        chmod o+x "$path"
    done
done
delegated=/sys/fs/cgroup/delegated-to-$user
mkdir "$delegated"
chown "$user:$user" "$delegated" "$delegated/cgroup.procs" "$delegated/cgroup.subtree_control" \
    "$delegated/cgroup.threads"
# Root moves the process into the delegated cgroup: the user may not write the root's
# cgroup.procs, which moving out of the root cgroup takes.
sh -c "echo \$\$ > $delegated/cgroup.procs && exec setpriv --reuid=$user --regid=$user \
    --clear-groups env HOME=/tmp $pytest"
as_user=$?

echo "== cgroup v2 lane: root $as_root, uid $user $as_user"
[ "$as_root" = 0 ] && [ "$as_user" = 0 ]
