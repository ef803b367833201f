"""Which executor runs the steps of a run: in process by default, or each step in its own
process or Docker container (OSA_EXECUTOR)."""

import os

import dagster as dg

from osa_dagster import __version__
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.run_worker import recording_worker
from osa_dagster.settings import Settings

# What a step container needs from the orchestrator's environment, besides every OSA_*
# variable (all of them: a step loads the same definitions and settings).
STEP_ENV_VARS = (
    "DAGSTER_HOME",
    "DOCKER_HOST",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def ingest_executor(settings: Settings) -> dg.ExecutorDefinition:
    """In-process by default: hooks already run in their own processes or containers, and a
    process per step costs seconds per partition. OSA_EXECUTOR=multiprocess isolates steps
    in processes, OSA_EXECUTOR=docker in containers (see docker_step_executor)."""
    choice = settings.executor
    if choice == "docker":
        return recording_worker(docker_step_executor(settings))
    executors = {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}
    return recording_worker(executors[choice])


def docker_step_executor(settings: Settings) -> dg.ExecutorDefinition:
    """dagster_docker's executor: every step in its own container of OSA_STEP_IMAGE, removed
    when the step ends (see step_containers).

    Steps use the host's network, so they reach services on 127.0.0.1 (S3, PostgreSQL). The
    Dagster home, the data folder and a unix DOCKER_HOST socket are mounted at the same paths
    as on the host, so a step sees the files the orchestrator sees and the Docker runner's
    bind mounts name paths that the Docker engine can find; the folders and files of
    OSA_SOURCES are mounted read-only, so that raw_batch reads them where they were planned.
    """
    from osa_dagster.defs.step_containers import STEP_LABEL, removing_docker_executor

    data_dir = str(settings.data_dir)
    mounts = {path: "rw" for path in (os.environ.get("DAGSTER_HOME", ""), data_dir) if path}
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if docker_host.startswith("unix://"):
        mounts[docker_host.removeprefix("unix://")] = "rw"
    for convention in load_conventions(settings).values():
        if convention.location and convention.location.startswith("/"):
            mounts.setdefault(convention.location, "ro")
    volumes = {path: {"bind": path, "mode": mode} for path, mode in mounts.items()}
    return removing_docker_executor.configured(
        {
            "image": settings.step_image or f"osa-dagster-step:{__version__}",
            "network": "host",
            "env_vars": [
                name for name in os.environ if name in STEP_ENV_VARS or name.startswith("OSA_")
            ],
            "container_kwargs": {"volumes": volumes, "labels": {STEP_LABEL: data_dir}},
        },
        name="docker",
    )
