"""Many hosts on one machine: each host is a Linux network namespace with its own loopback, its own host name
and one address on a shared bridge, so that servers talk over a network, and a host can vanish from it. The
runner (the test's own process) has an address on the bridge too.

Needs root (iproute2's `ip netns`): ``namespaces_unavailable`` says why where namespaces cannot be made.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.processes import spawn

LOCK = Path("/tmp/segserve-test-hosts.lock")  # held while a run picks its subnet, so two runs pick two


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    probe = f"segserve-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """A network namespace with ``address`` on the bridge; ``veth`` is its cable's end at the bridge.

    Its processes run under its own host name (a UTS namespace each), which ``/etc/netns/<netns>/hosts``
    resolves, as ``ip netns exec`` puts that file in place of /etc/hosts for them."""

    name: str
    netns: str
    address: str
    veth: str
    directory: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def command(self, *argv: str) -> list[str]:
        # `ip netns exec` and `unshare` exec, and so does the shell: the process started is argv's own.
        naming = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", naming, self.name, *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout)

    def spawn(
        self, label: str, argv: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host, in a process group of its own, its output in ``log(label)``."""
        process = spawn(self.command(*argv), self.log(label), env=env, cwd=cwd or self.directory)
        self.processes[label] = process
        return process

    def log(self, label: str) -> Path:
        return self.directory / f"{label}.log"

    def read_log(self, label: str) -> str:
        """What the process wrote so far ("" when it never started)."""
        path = self.log(label)
        return path.read_text(errors="replace") if path.exists() else ""

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def kill(self) -> None:
        """SIGKILL every process inside the host, those its processes started included."""
        for _ in range(100):  # a parent killed mid-fork may leave a child born after the listing
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def cut(self) -> None:
        """The host's cable is pulled: it runs on, and nothing it sends or is sent arrives, with no reset."""
        ip("link", "set", self.veth, "down")

    def down(self) -> None:
        """The host vanishes: its cable is pulled first (no goodbye reaches anyone), then it loses power."""
        self.cut()
        self.kill()

    def unroute(self, address: str) -> None:
        """The link from this host to ``address`` is cut, every other link stays: what it sends there is
        dropped (a black hole: open connections hear nothing, no reset), and a new connection fails at once."""
        ip("-n", self.netns, "route", "add", "blackhole", f"{address}/32")

    def reroute(self, address: str) -> None:
        """The link to ``address`` is mended."""
        ip("-n", self.netns, "route", "del", "blackhole", f"{address}/32")


class Network:
    """A bridge on a private /24 of its own, the runner at .1 on it, and hosts joined to it by veth pairs.
    Every name carries a per-run suffix, so runs side by side (and leftovers of a killed run) never meet."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.suffix = secrets.token_hex(3)
        self.bridge = f"sgb{self.suffix}"
        self.hosts: list[Host] = []
        self.prefix = ""
        try:
            with LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.prefix = self.free_prefix()
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.runner_address}/24", "dev", self.bridge)
                ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def free_prefix() -> str:
        """10.213.N with no address of this machine in it."""
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for n in range(256):
            if f" 10.213.{n}." not in used:
                return f"10.213.{n}"
        raise RuntimeError("every 10.213.N.0/24 is in use")

    @property
    def runner_address(self) -> str:
        return f"{self.prefix}.1"

    def add(self, name: str) -> Host:
        """A new host: its own namespace, loopback up, one address on the bridge, its name resolvable."""
        number = len(self.hosts) + 2
        host = Host(
            name=name,
            netns=f"segserve-{self.suffix}-{name}",
            address=f"{self.prefix}.{number}",
            veth=f"sg{self.suffix}h{number}",
            directory=self.directory / name,
        )
        host.directory.mkdir()
        self.hosts.append(host)  # before it exists, so close() removes whatever part of it was made
        hosts_file = Path("/etc/netns") / host.netns / "hosts"
        hosts_file.parent.mkdir(parents=True)
        hosts_file.write_text(f"127.0.0.1 localhost\n{host.address} {host.name}\n")
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")  # 127.0.0.1 inside is the host's own
        return host

    def close(self) -> None:
        for host in reversed(self.hosts):
            host.kill()
            for args in (("netns", "del", host.netns), ("link", "del", host.veth)):
                subprocess.run(["ip", *args], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def tails(self, lines: int = 25) -> str:
        parts = []
        for host in self.hosts:
            for log in sorted(host.directory.glob("*.log")):
                tail = [line[:300] for line in log.read_text(errors="replace").splitlines()[-lines:]]
                parts.append(f"----- {host.name} ({host.address}) {log.name} -----\n" + "\n".join(tail))
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """On failure, print the tail of every process's log, so the report says what each host saw."""
        try:
            yield
        except BaseException:
            print(self.tails())
            raise
