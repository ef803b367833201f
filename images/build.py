"""Build the container images without a registry.

    python images/build.py            # the base, then every convention's hook image
    python images/build.py --step     # also the step image for dagster_docker's executor

1. `osa-base:bookworm`: a minimal Debian made by debootstrap and imported into Docker.
2. Per convention with a `hook_image`: that base plus a virtualenv holding osa-sdk, this
   project (its hook modules) and the convention's requirements, all installed from
   wheels made on this host and pinned to the versions installed here, so a hook runs in
   its container on the same library versions as in the local runner.
3. With --step, `osa-dagster-step:<version>`: the project with all its dependencies, for
   running Dagster steps in containers.

Everything is cached: the base is built once per Docker engine, wheels by pip's cache,
and the image layers by Docker's, with the third-party layer below the project's, so a
run after a code change only reinstalls the project's two small wheels.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "osa-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CACHE = ROOT / "images" / ".cache"
VENV = "/opt/osa"

DOCKERFILE = f"""\
FROM {BASE_IMAGE}
ENV PATH={VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
COPY third_party /wheels/third_party
RUN python3 -m venv {VENV} \\
 && {VENV}/bin/pip install --no-cache-dir --no-index --find-links /wheels/third_party \\
    -r /wheels/third_party/requirements.txt \\
 && rm -rf /wheels/third_party
COPY project /wheels/project
RUN {VENV}/bin/pip install --no-cache-dir --no-index --no-deps /wheels/project/*.whl \\
 && rm -rf /wheels/project
WORKDIR /tmp
"""
# Hooks run unprivileged (the Docker runner also says so on every container); steps run as
# root, as they must write the Dagster instance and the data folder they share with the host.
HOOK_USER = "USER 65534:65534\n"


def run(command: Sequence[str], **kwargs: object) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def image_exists(name: str) -> bool:
    found = subprocess.run(["docker", "image", "inspect", name], capture_output=True)
    return found.returncode == 0


def build_base() -> None:
    if image_exists(BASE_IMAGE):
        print(f"{BASE_IMAGE}: cached")
        return
    with tempfile.TemporaryDirectory(prefix="osa-rootfs-") as rootfs:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                rootfs,
                DEBIAN_MIRROR,
            ],
            stdout=subprocess.DEVNULL,
        )
        # The package lists and caches are no use in an image that never runs apt.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(Path(rootfs, leftover), ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout)
        if tar.wait() != 0:
            raise SystemExit("tar of the debootstrap root failed")


def pinned(requirements: Iterable[str]) -> list[str]:
    """Each requirement at the version installed here (the name as given when it is not)."""
    from importlib.metadata import PackageNotFoundError, version

    result = []
    for requirement in requirements:
        try:
            result.append(f"{requirement}=={version(requirement)}")
        except PackageNotFoundError:
            result.append(requirement)
    return result


def project_wheels(into: Path) -> None:
    into.mkdir(parents=True)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "-w",
            str(into),
            "./sdk",
            ".",
        ],
        cwd=ROOT,
    )


def third_party_wheels(requirements: list[str], into: Path) -> None:
    into.mkdir(parents=True)
    (into / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))
    constraints = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints_file = into.parent / "constraints.txt"
    constraints_file.write_text(constraints)
    wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(into)]
    run([*wheel, "-c", str(constraints_file), "-r", str(into / "requirements.txt")])


def build_image(name: str, requirements: list[str], *, dockerfile_extra: str = "") -> None:
    started = time.monotonic()
    context = CACHE / name.replace("/", "_").replace(":", "_")
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    third_party_wheels(requirements, context / "third_party")
    project_wheels(context / "project")
    (context / "Dockerfile").write_text(DOCKERFILE + dockerfile_extra)
    run(
        ["docker", "build", "--quiet", "-t", name, str(context)],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    print(f"{name}: built in {time.monotonic() - started:.1f} s")


def hook_images() -> dict[str, list[str]]:
    """Image name -> what its hooks need besides osa-sdk and this project."""
    sys.path.insert(0, str(ROOT))
    from osa_dagster.conventions.registry import load_conventions
    from osa_dagster.settings import Settings

    images: dict[str, list[str]] = {}
    for convention in load_conventions(Settings.from_env()).values():
        if convention.hook_image is not None:
            image = convention.hook_image
            images.setdefault(image.name, []).extend(image.requirements)
    return images


def step_image_requirements() -> list[str]:
    from importlib.metadata import requires

    declared = requires("osa-dagster") or []
    return [
        r.split(";")[0].strip()
        for r in declared
        if "extra ==" not in r and not r.startswith("osa-sdk")
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="also build the Dagster step image")
    args = parser.parse_args(argv)
    build_base()
    for name, requirements in hook_images().items():
        # boto3 for osa_sdk.remote: the Kubernetes runner's stagers run in the hook's image.
        requirements = pinned(["pydantic", "boto3", *dict.fromkeys(requirements)])
        build_image(name, requirements, dockerfile_extra=HOOK_USER)
    if args.step:
        from osa_dagster import __version__

        build_image(f"osa-dagster-step:{__version__}", step_image_requirements())


if __name__ == "__main__":
    main()
