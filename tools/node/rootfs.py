"""The node's base layers: a trimmed Debian rootfs with a kernel, and the agent's wheels.

`base_rootfs()` runs debootstrap (minbase, bookworm: python3 is 3.11) with the Debian
cloud kernel, keeps only the kernel modules the node needs (the cloud kernel has
NVMe and ext4 built in, so the root disk needs no initrd; vfat and virtio-blk for the
ESP and the UPDATES disk are modules) and trims documentation, locales and apt's
caches. `python_deps()` installs the project's runtime dependencies (read from
pyproject.toml) as cp311 manylinux wheels with the host's pip into a directory that
is copied into the image; nothing is compiled, so the host's toolchain does not leak
into the guest.

Invariants: each layer is a cache entry keyed by its inputs (this file, the package
list, the suite and mirror; or the dependency list and wheel tags); the kernel is at
/boot/vmlinuz inside the rootfs, so it travels with the slot image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tools.node.cache import REPO, Key, cached

SUITE = "bookworm"
MIRROR = os.environ.get("AB_E2E_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("python3", "linux-image-cloud-amd64", "libudev1")
# Loaded by the node's init; everything else under /lib/modules is deleted.
MODULES = (
    "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "virtio_pci", "virtio_blk",
    "efivarfs",  # systemd-boot nodes: LoaderEntrySelected
)  # fmt: skip
TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/zoneinfo",
    "usr/share/bug",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf",
    "var/log",
    "usr/lib/udev/hwdb.d",  # no udevd runs on the node; its hardware database is unused
    "usr/lib/x86_64-linux-gnu/gconv",  # glibc iconv modules: python has its own codecs
)
WHEEL_TAGS = (
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--only-binary=:all:",
    "--platform", "manylinux_2_28_x86_64",
    "--platform", "manylinux_2_17_x86_64",
    "--platform", "manylinux2014_x86_64",
)  # fmt: skip


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build tool; on failure raise with its output, which names what went wrong."""
    args = [str(a) for a in argv]
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with exit status {proc.returncode}:\n"
            f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
    return proc  # type: ignore[no-any-return]


def debootstrap(cache: Path) -> Path:
    """Directory holding `rootfs/`: debootstrap's output, untouched (the slow step)."""
    key = Key("debootstrap").text(SUITE, MIRROR, PACKAGES)

    def build(out: Path) -> None:
        run(
            "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            SUITE, out / "rootfs", MIRROR,
        )  # fmt: skip

    return cached(cache, key, build)


def base_rootfs(cache: Path) -> Path:
    """Directory holding `rootfs/`: Debian minbase + python3 + kernel, trimmed."""
    bootstrapped = debootstrap(cache)
    key = Key("base").files([Path(__file__)]).text(bootstrapped.name, MODULES, TRIM)

    def build(out: Path) -> None:
        run("cp", "-a", bootstrapped / "rootfs", out / "rootfs")
        _trim(out / "rootfs")

    return cached(cache, key, build)


def _trim(root: Path) -> None:
    for rel in TRIM:
        shutil.rmtree(root / rel, ignore_errors=True)
        (root / rel).mkdir(parents=True)
    (root / "usr/lib/udev/hwdb.bin").unlink(missing_ok=True)
    for rel in ("boot/efi", "var/lib/updater", "mnt/updates", "etc/e2e", "etc/updater"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    _keep_kernel(root)


def _keep_kernel(root: Path) -> None:
    boot = root / "boot"
    (kernel,) = boot.glob("vmlinuz-*")
    version = kernel.name.removeprefix("vmlinuz-")
    for path in list(boot.iterdir()):
        if path != kernel and path.is_file():
            path.unlink()
    kernel.rename(boot / "vmlinuz")
    for link in ("vmlinuz", "vmlinuz.old", "initrd.img", "initrd.img.old"):
        if (root / link).is_symlink():
            (root / link).unlink()
    moddir = root / "usr/lib/modules" / version
    needed = _with_dependencies(moddir, MODULES)
    for path in list((moddir / "kernel").rglob("*.ko*")):
        if str(path.relative_to(moddir)) not in needed:
            path.unlink()
    run("chroot", root, "depmod", version)
    (root / "etc/e2e/kernel-version").write_text(version + "\n")


def _with_dependencies(moddir: Path, names: tuple[str, ...]) -> set[str]:
    """Module paths (relative to `moddir`) of `names` and everything they depend on."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    builtin = (moddir / "modules.builtin").read_text()
    todo, needed = [], set()
    for name in names:
        if name in by_name:
            todo.append(by_name[name])
        elif f"/{name}.ko" not in builtin:
            raise RuntimeError(f"kernel module {name} is neither built in nor in {moddir}")
    while todo:
        path = todo.pop()
        if path not in needed:
            needed.add(path)
            todo.extend(deps[path])
    return needed


def runtime_dependencies() -> list[str]:
    """The project's [project].dependencies, as pip requirement strings."""
    with (REPO / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def python_deps(cache: Path) -> Path:
    """Directory holding `site/`: the agent's dependencies as installed cp311 wheels."""
    deps = runtime_dependencies()
    key = Key("pydeps").files([Path(__file__)]).text(deps, WHEEL_TAGS)

    def build(out: Path) -> None:
        site = out / "site"
        run(
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-compile", "--target", site, *WHEEL_TAGS, *deps,
        )  # fmt: skip
        shutil.rmtree(site / "bin", ignore_errors=True)

    return cached(cache, key, build)
