# One entry point. `make demo` runs the main job, `make test` runs the tests; each makes
# the virtual environment it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The repository's instance unless the shell names another, so that `make ui` shows what
# the `osa` and `dagster` commands of the same shell see.
export DAGSTER_HOME ?= $(CURDIR)
# `make ui PORT=3001` when 3000 is taken.
PORT ?= 3000

.PHONY: demo demo-s3 demo-cgroup2 test test-cgroup2 lint images k8s-check ui stack bench clean sandbox-tools

$(STAMP): pyproject.toml sdk/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./sdk -e '.[dev]'
	touch $@

# The hook sandbox's tools: Debian's bubblewrap, and util-linux's setpriv (as root) and
# prlimit (rootless). Installed where missing if this runs as root with apt-get; without them
# the orchestrator refuses to run hooks until they are installed or OSA_HOOK_SANDBOX=off.
sandbox-tools:
	@command -v bwrap >/dev/null && command -v setpriv >/dev/null && command -v prlimit >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends bubblewrap util-linux >/dev/null; } || \
	echo "bubblewrap not installed: hooks will be refused; install the Debian packages" \
	  "bubblewrap and util-linux as root, or set OSA_HOOK_SANDBOX=off to run them unsandboxed"

demo: $(STAMP) sandbox-tools
	$(BIN)/osa demo

# The same demo with every artifact in a local S3 server (SeaweedFS, started and stopped here).
demo-s3: $(STAMP) sandbox-tools
	$(BIN)/python -m osa_dagster.storage.local_s3 -- $(BIN)/osa demo

test: $(STAMP) sandbox-tools
	$(BIN)/python -m pytest

# The runner's real-kernel cgroup tests on cgroup v2, in a QEMU guest booted from the
# installed Debian kernel (needs qemu-system-x86 linux-image-amd64 busybox-static cpio):
# as root, then as an unprivileged user in a delegated cgroup.
test-cgroup2: $(STAMP)
	$(BIN)/python scripts/cgroup2_vm.py -- sh scripts/cgroup2_lane.sh

# The whole demo in that guest, as an unprivileged user in a delegated cgroup with hooks
# sandboxed rootless (5 to 20 minutes under emulation: not part of CI).
demo-cgroup2: $(STAMP) sandbox-tools
	$(BIN)/python scripts/cgroup2_vm.py --memory-mb 3072 --timeout-s 3600 -- sh scripts/cgroup2_demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The hook images for the Docker runner (needs a Docker engine and debootstrap; cached).
images: $(STAMP)
	$(BIN)/python images/build.py --step

# The Kubernetes runner against a real cluster (kind, k3s): see scripts/k8s_runner_check.py
# for what it needs, and pass its options as ARGS="...".
k8s-check: $(STAMP)
	$(BIN)/python scripts/k8s_runner_check.py $(ARGS)

ui: $(STAMP)
	$(BIN)/dagster dev -w workspace.yaml -p $(PORT)

# The production profile on one machine: PostgreSQL, SeaweedFS and dagster dev, until Ctrl-C.
stack: $(STAMP)
	$(BIN)/osa stack

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf .data
