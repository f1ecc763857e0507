"""A real S3 API server for the tests: a one-node Ceph cluster (a monitor, and one object store daemon that keeps
its objects in memory) with its RADOS Gateway on loopback, started from nothing in seconds.

Ceph's RGW is what many on-premises deployments of segserve would use; it checks SigV4 signatures (presigned
URLs included), speaks multipart uploads, bulk deletes and lifecycle rules. It needs Ceph's packages
(`segserve setup --with-s3`) and root, as the tests have.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.harness.processes import free_port, spawn, stop_process, wait_until

ACCESS_KEY = "SEGSERVETESTS0000KEY"
SECRET_KEY = "segserve-tests-secret-key-not-a-secret-00"
REGION = "us-east-1"

# Cephx off (loopback, throwaway), so the messengers must not ask for "secure" mode either; one replica of
# everything; and the monitor proposes map changes at once, not each second (the gateway makes its pools at
# its first start: ~20 s with Ceph's defaults, ~6 s so).
CONFIG = """[global]
fsid = {fsid}
mon host = v2:{address}:{monitor_port}
mon initial members = a
public addr = {address}
cluster addr = {address}
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms mon client mode = crc
ms client mode = crc
ms mon cluster mode = crc
ms mon service mode = crc
ms cluster mode = crc
ms service mode = crc
ms bind ipv6 = false
run dir = {directory}/run
admin socket = {directory}/run/$name.asok
log file = {directory}/log/$name.log
keyring = {directory}/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.05
paxos min wait = 0.01
[mon.a]
mon data = {directory}/mon.a
[osd.0]
osd data = {directory}/osd.0
osd objectstore = memstore
memstore device bytes = {memory_bytes}
osd max object name len = 460
osd max object namespace len = 64
[client.rgw]
rgw data = {directory}/rgw
rgw frontends = beast endpoint={address}:{gateway_port}
rgw enable usage log = false
"""


@dataclass
class CephS3:
    directory: Path
    memory_bytes: int = 2 << 30  # what its object store may hold
    address: str = "127.0.0.1"  # where it listens: loopback, or a network's address for other hosts
    monitor_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.gateway_port}"

    @property
    def config(self) -> Path:
        return self.directory / "ceph.conf"

    def start(self, attempts: int = 3) -> None:
        """Start the cluster. A start that fails (a port taken between choosing and binding it, a monitor slow to
        answer on a busy machine) is stopped whole, its logs kept in the error, and tried again from nothing on
        fresh ports."""
        for attempt in range(1, attempts + 1):
            try:
                self.start_once()
                return
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                self.stop()
                if attempt == attempts:
                    raise RuntimeError(
                        f"Ceph did not start in {attempts} tries; the last: {exc}\n{self.logs()}"
                    ) from exc
                shutil.rmtree(self.directory)
                self.monitor_port, self.gateway_port = free_port(), free_port()

    def start_once(self) -> None:
        for part in ("run", "log", "mon.a", "osd.0", "rgw"):
            (self.directory / part).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.config.write_text(
            CONFIG.format(
                fsid=fsid,
                directory=self.directory,
                monitor_port=self.monitor_port,
                gateway_port=self.gateway_port,
                memory_bytes=self.memory_bytes,
                address=self.address,
            )
        )
        monmap = self.directory / "monmap"
        self.run(
            "monmaptool",
            "--create",
            "--fsid",
            fsid,
            "--addv",
            "a",
            f"[v2:{self.address}:{self.monitor_port}]",
            str(monmap),
        )
        self.run(
            "ceph-authtool",
            "--create-keyring",
            str(self.directory / "keyring"),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        self.run("ceph-mon", "-c", str(self.config), "--mkfs", "-i", "a", "--monmap", str(monmap))
        self.daemon("ceph-mon", "-i", "a")
        wait_until(
            lambda: (
                self.alive()
                and self.run("ceph", "-c", str(self.config), "--connect-timeout", "10", "mon", "stat")
            ),
            60,
            "Ceph's monitor",
        )
        osd_uuid = str(uuid.uuid4())
        osd = self.run(
            "ceph", "-c", str(self.config), "--connect-timeout", "20", "osd", "new", osd_uuid
        ).strip()
        self.run("ceph-osd", "-c", str(self.config), "-i", osd, "--mkfs", "--osd-uuid", osd_uuid)
        self.daemon("ceph-osd", "-i", osd)
        wait_until(
            lambda: (
                self.alive() and f"osd.{osd} up" in self.run("ceph", "-c", str(self.config), "osd", "dump")
            ),
            60,
            "Ceph's object store daemon",
        )
        self.daemon("radosgw", "-n", "client.rgw")
        wait_until(
            lambda: self.alive() and httpx.get(self.endpoint, timeout=2).status_code < 500,
            60,
            "Ceph's RADOS Gateway",
        )
        self.run(
            "radosgw-admin",
            "-c",
            str(self.config),
            "user",
            "create",
            "--uid=segserve",
            "--display-name=segserve",
            f"--access-key={ACCESS_KEY}",
            f"--secret-key={SECRET_KEY}",
        )

    def run(self, *command: str) -> str:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def daemon(self, program: str, *args: str) -> None:
        """A Ceph daemon in the foreground, in its own process group, so stopping it leaves nothing."""
        command = [program, "-f", "-c", str(self.config), *args]
        self.daemons.append(spawn(command, self.directory / "log" / f"{program}.out"))

    def alive(self) -> bool:
        """True while every daemon runs; a daemon that has exited ends the wait for it at once."""
        for daemon in self.daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{daemon.args!r} exited with {daemon.returncode}")
        return True

    def logs(self, lines: int = 15) -> str:
        """The ends of the daemons' logs, for an error that says why a start failed."""
        tails = []
        for log in sorted((self.directory / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(tails)

    def stop(self) -> None:
        for daemon in reversed(self.daemons):  # the gateway first: it waits for the others as it stops
            stop_process(daemon)
        self.daemons.clear()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def bucket(self, name: str) -> str:
        """A new bucket's name."""
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "segserve") -> dict[str, str]:
        """The settings that point segserve's blob store at ``bucket``."""
        return {
            "SEGSERVE_BLOB_URL": f"s3://{bucket}/{prefix}",
            "SEGSERVE_BLOB_ENDPOINT": self.endpoint,
            "SEGSERVE_BLOB_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
