"""Run one command inside a throw-away virtual machine whose kernel mounts cgroup v2 only.

    python scripts/cgroup2_vm.py [--memory-mb N] [--timeout-s S] -- COMMAND [ARG...]

The hook engine's cgroup v2 code needs a cgroup v2 kernel to be tested against, and a host
mounted with cgroup v1 cannot become one: the memory controller stays bound to v1 until
reboot. So this boots the host's own Debian kernel (`linux-image-amd64`) under QEMU in
software emulation (TCG: no KVM needed, about 17 times slower than the host for Python):

- the host's / is shared read-only over virtio-9p, under a tmpfs overlay that makes it
  writable in the guest; nothing written there reaches the host;
- /sys/fs/cgroup is the cgroup v2 hierarchy, with the memory and pids controllers handed
  to the root's children (cpu and io too where the kernel has them);
- COMMAND runs as root, in the root cgroup, in the caller's working folder and with the
  caller's environment (less a few variables of the caller's terminal and login), and its
  stdout and stderr are printed once the guest has powered off.

The exit status is COMMAND's (128 + N when it died of signal N), or 125 when the machine
itself could not run (its console is printed), or 124 when --timeout-s ran out. Host
packages (Debian): qemu-system-x86 linux-image-amd64 busybox-static cpio. The kernel,
unpacked, and the initramfs are cached in --cache (built once per kernel and script).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_MACHINE_FAILED = 125
EXIT_TIMED_OUT = 124
BUSYBOX = Path("/bin/busybox")
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DEFAULT_CACHE = Path("/var/tmp/osa-cgroup2-vm")
# The caller's variables that describe its terminal and login, not what the command needs.
NOT_CARRIED = {"PWD", "OLDPWD", "SHLVL", "TERM", "HOSTNAME", "DISPLAY", "XDG_RUNTIME_DIR", "_"}
NINEP = "trans=virtio,version=9p2000.L,msize=512000"
XZ_MAGIC = b"\xfd7zXZ\x00"

# PID 1 of the initramfs: modules, the host's / under an overlay, then the real root.
STAGE1 = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc && mount -t sysfs sys /sys && mount -t devtmpfs dev /dev
for module in /modules/*.ko; do insmod "$module"; done
halt() { echo "osa-vm: $*"; poweroff -f; }
mkdir -p /host /control /layers /root
mount -t 9p -o {ninep},ro,cache=loose host /host || halt "cannot mount the host's /"
mount -t 9p -o {ninep},cache=none control /control || halt "cannot mount the control folder"
mount -t tmpfs -o mode=755 layers /layers && mkdir /layers/upper /layers/work
mount -t overlay -o lowerdir=/host,upperdir=/layers/upper,workdir=/layers/work root /root \\
    || halt "cannot mount the overlay"
mount -t proc proc /root/proc && mount -t sysfs sys /root/sys && mount -t devtmpfs dev /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /root/dev/pts
mount -t tmpfs -o mode=1777 shm /root/dev/shm
mount -t cgroup2 -o nsdelegate cgroup2 /root/sys/fs/cgroup || halt "no cgroup v2"
mount -t tmpfs -o mode=755 run /root/run && mkdir -p /root/run/osa-vm/control
mount --move /control /root/run/osa-vm/control
cp /bin/busybox /stage2 /root/run/osa-vm/
exec switch_root /root /run/osa-vm/stage2
"""

# PID 1 on the host's /: the loopback device (tests listen on 127.0.0.1), controllers for
# the root's children, the command, its status.
STAGE2 = """#!/run/osa-vm/busybox sh
control=/run/osa-vm/control
/run/osa-vm/busybox ip link set lo up
echo "+memory +pids +cpu +io" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \\
    || echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
/bin/sh $control/command.sh > $control/stdout 2> $control/stderr < /dev/null
echo $? > $control/status.partial
/run/osa-vm/busybox sync
/run/osa-vm/busybox mv $control/status.partial $control/status
/run/osa-vm/busybox poweroff -f
"""


class MachineError(RuntimeError):
    """The virtual machine could not be prepared or run; the message says why."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-mb", type=int, default=2048, help="guest RAM (default 2048)")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--kernel", help="a version under /boot (default: the newest -amd64)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    try:
        return run_in_machine(
            command,
            memory_mb=args.memory_mb,
            timeout_s=args.timeout_s,
            kernel=args.kernel or newest_kernel(),
            cache=args.cache,
        )
    except MachineError as error:
        print(f"cgroup2_vm: {error}", file=sys.stderr)
        return EXIT_MACHINE_FAILED


def newest_kernel() -> str:
    versions = [
        path.name.removeprefix("vmlinuz-") for path in Path("/boot").glob("vmlinuz-*-amd64")
    ]
    if not versions:
        raise MachineError("no /boot/vmlinuz-*-amd64: apt-get install linux-image-amd64")
    return max(versions, key=lambda v: [int(p) if p.isdigit() else p for p in v.split(".")])


def run_in_machine(
    command: Sequence[str], *, memory_mb: int, timeout_s: float, kernel: str, cache: Path
) -> int:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise MachineError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    vmlinux, initramfs = boot_files(kernel, cache)
    with tempfile.TemporaryDirectory(prefix="osa-vm-control-") as control_name:
        control = Path(control_name)
        (control / "command.sh").write_text(command_script(command))
        machine = [
            qemu,
            *("-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1", "-m", str(memory_mb)),
            *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
            *("-serial", f"file:{control / 'console.log'}"),
            *("-kernel", str(vmlinux), "-initrd", str(initramfs)),
            *("-append", "console=ttyS0 quiet loglevel=1 panic=-1 mitigations=off tsc=reliable"),
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={control},mount_tag=control,security_model=passthrough",
        ]
        started = time.monotonic()
        try:
            qemu_run = subprocess.run(
                machine, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            print(f"cgroup2_vm: timed out after {timeout_s:.0f} s", file=sys.stderr)
            return EXIT_TIMED_OUT
        for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            if (control / name).exists():
                stream.write((control / name).read_text(errors="replace"))
                stream.flush()
        status = control / "status"
        if not status.exists():
            console = (control / "console.log").read_text(errors="replace")
            raise MachineError(
                f"the machine stopped without the command's status (qemu exit "
                f"{qemu_run.returncode}): {qemu_run.stderr.decode(errors='replace')}{console}"
            )
        print(f"cgroup2_vm: guest ran {time.monotonic() - started:.1f} s", file=sys.stderr)
        return int(status.read_text())


def command_script(command: Sequence[str]) -> str:
    """The guest's shell script: the caller's environment and folder, then the command."""
    lines = [
        f"export {name}={shlex.quote(value)}"
        for name, value in os.environ.items()
        if name not in NOT_CARRIED and name.isidentifier()
    ]
    lines += [
        "export IN_CGROUP2_VM=1",
        f"cd {shlex.quote(str(Path.cwd()))} || exit {EXIT_MACHINE_FAILED}",
        "exec " + shlex.join(command),
    ]
    return "\n".join(lines) + "\n"


def boot_files(kernel: str, cache: Path) -> tuple[Path, Path]:
    """The kernel unpacked (QEMU boots its ELF directly, which spares the guest ~10 s of
    emulated decompression) and the initramfs, built once per kernel and script version."""
    bz_image = Path(f"/boot/vmlinuz-{kernel}")
    if not bz_image.is_file():
        raise MachineError(f"{bz_image} not found: apt-get install linux-image-amd64")
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    folder = cache / f"{kernel}-{version}"
    vmlinux, initramfs = folder / "vmlinux", folder / "initramfs.cpio"
    if vmlinux.exists() and initramfs.exists():
        return vmlinux, initramfs
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as build_name:
        build = Path(build_name)
        packed = bz_image.read_bytes()
        start = packed.find(XZ_MAGIC)
        if start < 0:
            raise MachineError(f"{bz_image} holds no xz-compressed kernel")
        (build / "vmlinux").write_bytes(lzma.LZMADecompressor().decompress(packed[start:]))
        _initramfs(kernel, build / "tree", build / "initramfs.cpio")
        # Renamed into place last: a build cut short leaves nothing that looks finished.
        (build / "vmlinux").rename(vmlinux)
        (build / "initramfs.cpio").rename(initramfs)
    return vmlinux, initramfs


def _initramfs(kernel: str, tree: Path, archive: Path) -> None:
    if not BUSYBOX.is_file() or b"not a dynamic" not in _ldd(BUSYBOX):
        raise MachineError(f"{BUSYBOX} must be the static busybox: apt-get install busybox-static")
    if shutil.which("cpio") is None:
        raise MachineError("cpio not found: apt-get install cpio")
    for folder in ("bin", "dev", "proc", "sys", "modules"):
        (tree / folder).mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for number, module in enumerate(_module_files(kernel)):
        # Numbered: the init loads them in the order their dependencies need.
        shutil.copyfile(module, tree / f"modules/{number:02d}-{module.name}")
    for name, text in (("init", STAGE1.replace("{ninep}", NINEP)), ("stage2", STAGE2)):
        (tree / name).write_text(text)
        (tree / name).chmod(0o755)
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    with archive.open("wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, input=files, stdout=out, check=True
        )


def _module_files(kernel: str) -> list[Path]:
    """The .ko files of MODULES and what they need, dependencies first, each once."""
    ordered: list[Path] = []
    for module in MODULES:
        steps = subprocess.run(
            ["modprobe", "-S", kernel, "--show-depends", module],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
        for step in steps:
            parts = step.split()
            if parts[:1] == ["insmod"] and Path(parts[1]) not in ordered:
                if not parts[1].endswith(".ko"):
                    raise MachineError(f"{parts[1]}: only uncompressed modules are supported")
                ordered.append(Path(parts[1]))
    return ordered


def _ldd(path: Path) -> bytes:
    result = subprocess.run(["ldd", str(path)], capture_output=True, env={"LC_ALL": "C"})
    return result.stdout + result.stderr


if __name__ == "__main__":
    sys.exit(main())
