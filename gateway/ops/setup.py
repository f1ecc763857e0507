"""``segserve setup``: the system packages the stack needs (redis-server, Java 17+), and those its tests need
(chromium for the web page, Ceph's RADOS Gateway as a real S3 server), installed with apt-get where that is
possible, else named."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


class SetupError(RuntimeError):
    """Something this machine lacks; the message says exactly what to install."""


def java_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else 0


# Ceph's monitor, object store daemon and RADOS Gateway: a one-node cluster whose S3 API the tests use.
CEPH = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "radosgw": "radosgw", "ceph": "ceph-common"}


def missing_system_packages(with_browser: bool = False, with_s3: bool = False) -> list[str]:
    """Debian package names for what the stack (and, with_browser, its web page test; with_s3, its S3 tests)
    needs and this machine lacks."""
    missing = []
    if with_browser and not shutil.which("chromium"):
        missing.append("chromium")
    if with_s3:
        missing += sorted({package for program, package in CEPH.items() if not shutil.which(program)})
    if not shutil.which("redis-server"):
        missing.append("redis-server")
    java = shutil.which("java")
    if not java or java_version(java) < 17:
        missing.append("openjdk-17-jre-headless")
    return missing


def setup(with_browser: bool = False, with_s3: bool = False) -> None:
    """Install redis-server and Java 17+ when missing and possible (root on Debian/Ubuntu), else explain."""
    missing = missing_system_packages(with_browser, with_s3)
    if not missing:
        return
    apt = shutil.which("apt-get")
    can_install = apt and (os.geteuid() == 0 or shutil.which("sudo"))
    if not can_install:
        mac = "brew install redis openjdk@17" if sys.platform == "darwin" else ""
        raise SetupError(
            f"segserve needs {', '.join(missing)}. Install "
            + (
                f"them with: {mac}"
                if mac
                else f"them with your package manager (Debian: apt-get install {' '.join(missing)})"
            )
        )
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    print(f"installing {', '.join(missing)} with apt-get …", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ceph = [package for package in missing if package in CEPH.values()]
    others = [package for package in missing if package not in ceph]
    commands = [["apt-get", "update", "-qq"]]
    if others:
        commands.append(["apt-get", "install", "-y", "-qq", *others])
    if ceph:  # its recommendations would add a few hundred MB the tests do not use
        commands.append(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *ceph])
    for command in commands:
        if subprocess.run(prefix + command, env=env, check=False).returncode != 0:
            raise SetupError(f"`{' '.join(command)}` failed; install {' '.join(missing)} yourself and retry")
    if still := missing_system_packages(with_browser, with_s3):
        raise SetupError(f"still missing after apt-get: {', '.join(still)}")
