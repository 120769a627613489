"""TLS and username/password reach etcd through the registry (real etcd, uvloop)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import uvloop

from lab.etcd import EtcdServer
from lab.netns import free_port, stop_process
from tunproxy.etcd.connection import EtcdSettings
from tunproxy.etcd.listing import list_leases
from tunproxy.etcd.registry import EtcdRegistry
from tunproxy.peers.base import OwnLease, Snapshot

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = json.dumps({"Network": "10.100.0.0/16"})


def run(coro, timeout: float = 30):  # type: ignore[no-untyped-def]
    async def bounded():  # type: ignore[no-untyped-def]
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


async def acquire_and_list(settings: EtcdSettings) -> None:
    reg = EtcdRegistry(settings, ttl=30, renew_margin=10)
    lease = await reg.acquire(IPv4Address("192.0.2.1"), "udp", None)
    updates = reg.updates()
    snapshot = await asyncio.wait_for(updates.__anext__(), 10)
    assert isinstance(snapshot, Snapshot) and [x.subnet for x in snapshot.leases] == [lease.subnet]
    await updates.aclose()
    await reg.close()
    rows = await list_leases(settings)
    assert [r["subnet"] for r in rows] == [str(lease.subnet)]


def test_username_and_password(etcd: EtcdServer, caplog):
    caplog.set_level(logging.INFO, logger="tunproxy.etcd")
    etcd.etcdctl("user", "add", "root", "--new-user-password=s3cret")
    etcd.etcdctl("auth", "enable")
    etcd.etcdctl("--user=root:s3cret", "put", f"{PREFIX}/config", CONFIG)

    run(acquire_and_list(EtcdSettings.create(etcd.endpoint, PREFIX, username="root", password="s3cret")))

    async def wrong_password() -> None:
        reg = EtcdRegistry(EtcdSettings.create(etcd.endpoint, PREFIX, username="root", password="nope"))
        task = asyncio.create_task(reg.network_config())
        await asyncio.sleep(2)
        assert not task.done()  # retried, not crashed
        task.cancel()
        await reg.close()

    run(wrong_password())
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"etcd at {etcd.endpoint} failed:"), lines


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


class CustomEtcd:
    """An etcd with flags EtcdServer does not take (TLS, a short auth token TTL); stopped by PID."""

    def __init__(self, workdir: Path, *flags: str, tls: bool = False) -> None:
        port, peer = free_port(), free_port()
        self.workdir = workdir
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        argv = [
            "etcd", "--name", "custom", "--data-dir", str(workdir / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"custom=http://127.0.0.1:{peer}",
            "--log-level", "warn", *flags,
        ]
        with open(workdir / "etcd.log", "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.ctl = ["etcdctl", f"--endpoints={self.endpoint}", "--dial-timeout=2s"]
        if tls:
            self.ctl.append(f"--cacert={workdir / 'ca.pem'}")
        deadline = time.monotonic() + 20
        while self.etcdctl("endpoint", "health", check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"etcd did not start: {(workdir / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ctl, *args], check=check, capture_output=True, text=True, timeout=15,
                              env=dict(os.environ, ETCDCTL_API="3"))

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def tls_etcd(tmp_path: Path):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make certificates")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=tunproxy-test-ca", cwd=tmp_path)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=tmp_path)
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "san.ext", cwd=tmp_path)
    server = CustomEtcd(tmp_path, "--cert-file", str(tmp_path / "server.pem"),
                        "--key-file", str(tmp_path / "server.key"), tls=True)
    try:
        server.etcdctl("put", f"{PREFIX}/config", CONFIG)
        yield server.endpoint, tmp_path / "ca.pem"
    finally:
        server.stop()


def test_an_expired_auth_token_is_renewed_quietly(tmp_path: Path, caplog):
    caplog.set_level(logging.DEBUG, logger="tunproxy.etcd")
    server = CustomEtcd(tmp_path, "--auth-token-ttl", "1")
    try:
        server.etcdctl("user", "add", "root", "--new-user-password=pw")
        server.etcdctl("auth", "enable")
        server.etcdctl("--user=root:pw", "put", f"{PREFIX}/config", CONFIG)
        settings = EtcdSettings.create(server.endpoint, PREFIX, username="root", password="pw")

        async def main() -> None:
            reg = EtcdRegistry(settings, ttl=30, renew_margin=10)
            lease = await reg.acquire(IPv4Address("192.0.2.1"), "udp", None)
            updates = reg.updates()
            assert isinstance(await asyncio.wait_for(updates.__anext__(), 10), Snapshot)
            await asyncio.sleep(2.5)  # the token expires
            await asyncio.to_thread(server.etcdctl, "--user=root:pw", "del",
                                    f"{PREFIX}/subnets/{lease.subnet.network_address}-24")
            again = await asyncio.wait_for(updates.__anext__(), 10)
            while not isinstance(again, OwnLease):
                again = await asyncio.wait_for(updates.__anext__(), 10)
            assert again.lease.subnet == lease.subnet
            await updates.aclose()
            await reg.close()

        run(main())
    finally:
        server.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "etcd at" in r.getMessage()]
    assert any("invalid auth token; logging in again" in r.getMessage() for r in caplog.records)


def test_tls(tls_etcd):
    endpoint, ca = tls_etcd
    run(acquire_and_list(EtcdSettings.create(endpoint, PREFIX, cafile=str(ca))))
    # A bare host:port becomes https when a CA is given.
    run(acquire_and_list(EtcdSettings.create(endpoint.removeprefix("https://"), PREFIX, cafile=str(ca))))
