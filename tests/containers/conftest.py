"""A real Docker engine and the images the container tests run.

The engine is DOCKER_HOST's (or the default socket). Without one the tests skip, except on
CI, where a missing engine fails them: `.ci/run` starts one and builds the images.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from osa_dagster import __version__
from osa_dagster.conventions.pdb import HOOK_IMAGE
from osa_dagster.defs.step_containers import STEP_LABEL
from osa_dagster.engine.runners.docker import ORCHESTRATOR_LABEL, RUNNER_LABEL, orchestrator_id
from tests.fixtures.services import unavailable

REPO = Path(__file__).resolve().parents[2]
PROBE_IMAGE = "osa-test-probe:latest"
STEP_IMAGE = f"osa-dagster-step:{__version__}"


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        where = os.environ.get("DOCKER_HOST", "(default)")
        unavailable(f"no Docker engine at DOCKER_HOST={where}: {error}")
    return client


@pytest.fixture(scope="session")
def pdb_hook_image(docker_client: docker.DockerClient) -> str:
    """The pdb convention's hook image, built by images/build.py when missing."""
    try:
        docker_client.images.get(HOOK_IMAGE.name)
    except docker.errors.ImageNotFound:
        subprocess.run([sys.executable, str(REPO / "images" / "build.py")], check=True)
    return HOOK_IMAGE.name


@pytest.fixture(scope="session")
def step_image(docker_client: docker.DockerClient, pdb_hook_image: str) -> str:
    """The step image of dagster_docker's executor, built by images/build.py when missing."""
    try:
        docker_client.images.get(STEP_IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run([sys.executable, str(REPO / "images" / "build.py"), "--step"], check=True)
    return STEP_IMAGE


@pytest.fixture(scope="session")
def probe_image(
    docker_client: docker.DockerClient,
    pdb_hook_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """The pdb hook image plus the sandbox_probe hook module."""
    context = tmp_path_factory.mktemp("probe-image")
    shutil.copy(Path(__file__).with_name("sandbox_probe.py"), context)
    (context / "Dockerfile").write_text(
        f"FROM {pdb_hook_image}\nCOPY sandbox_probe.py /opt/osa/lib/python3.11/site-packages/\n"
    )
    docker_client.images.build(path=str(context), tag=PROBE_IMAGE, rm=True)
    return PROBE_IMAGE


@pytest.fixture(autouse=True)
def no_container_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test must leave no hook container of this process behind, and no step
    container of its own data folder (the step executor labels them with it)."""
    yield
    if "docker_client" not in request.fixturenames:
        return
    client: docker.DockerClient = request.getfixturevalue("docker_client")
    ours = client.containers.list(
        all=True, filters={"label": [RUNNER_LABEL, f"{ORCHESTRATOR_LABEL}={orchestrator_id()}"]}
    )
    steps = client.containers.list(
        all=True, filters={"label": f"{STEP_LABEL}={os.environ['OSA_DATA_DIR']}"}
    )
    assert [c.name for c in [*ours, *steps]] == []
