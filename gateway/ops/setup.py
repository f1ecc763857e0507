"""``segserve setup``: the system packages the stack needs (redis-server, Java 17+, and for the web page's
test, chromium), installed with apt-get where that is possible, else named."""

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


def missing_system_packages(with_browser: bool = False) -> list[str]:
    """Debian package names for what the stack (and, with_browser, its web page test) needs and this machine lacks."""
    missing = []
    if with_browser and not shutil.which("chromium"):
        missing.append("chromium")
    if not shutil.which("redis-server"):
        missing.append("redis-server")
    java = shutil.which("java")
    if not java or java_version(java) < 17:
        missing.append("openjdk-17-jre-headless")
    return missing


def setup(with_browser: bool = False) -> None:
    """Install redis-server and Java 17+ when missing and possible (root on Debian/Ubuntu), else explain."""
    missing = missing_system_packages(with_browser)
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
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        if subprocess.run(prefix + command, env=env, check=False).returncode != 0:
            raise SetupError(f"`{' '.join(command)}` failed; install {' '.join(missing)} yourself and retry")
    if still := missing_system_packages(with_browser):
        raise SetupError(f"still missing after apt-get: {', '.join(still)}")
