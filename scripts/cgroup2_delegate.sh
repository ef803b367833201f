# Sourced by the cgroup v2 guest scripts (scripts/cgroup2_lane.sh, scripts/cgroup2_demo.sh),
# which run as root in the guest of scripts/cgroup2_vm.py: an unprivileged user in a cgroup
# delegated to it the way systemd's Delegate=yes does it (the folder and its cgroup.procs,
# cgroup.subtree_control and cgroup.threads owned by that user).

# delegate_cgroup USER PYTHON: the cgroup delegated to USER, made once; prints its path.
delegate_cgroup() {
    # The interpreter may live in a home only root may enter (pyenv under /root): let the
    # user through the folders above it and above the repository. The guest's / is an
    # overlay, so this changes nothing on the host.
    for path in "$(readlink -f "$2")" "$(pwd)"; do
        while [ "$path" != / ]; do
            path=$(dirname "$path")
            chmod o+x "$path"
        done
    done
    delegated=/sys/fs/cgroup/delegated-to-$1
    mkdir -p "$delegated"
    chown "$1:$1" "$delegated" "$delegated/cgroup.procs" "$delegated/cgroup.subtree_control" \
        "$delegated/cgroup.threads"
    echo "$delegated"
}

# run_delegated USER CGROUP COMMAND...: COMMAND as USER (HOME=/tmp) in CGROUP. Root moves
# the process there: the user may not write the root's cgroup.procs, which moving out of
# the root cgroup takes.
run_delegated() {
    sh -c 'echo $$ > "$2/cgroup.procs" || exit 125
        user=$1
        shift 2
        exec setpriv --reuid="$user" --regid="$user" --clear-groups env HOME=/tmp "$@"' \
        run_delegated "$@"
}
