"""Fixtures shared by the tiers: a namespace lab and a real etcd, both cleaned up by PID/name."""

from __future__ import annotations

import os
import shutil

import pytest

from tunproxy.lab import EtcdServer, Lab

IS_ROOT = os.geteuid() == 0
HAS_ETCD = shutil.which("etcd") is not None and shutil.which("etcdctl") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root for namespaces and TUN"))
        if "etcd" in item.keywords and not HAS_ETCD:
            item.add_marker(
                pytest.mark.skip(reason="needs etcd and etcdctl (apt install etcd-server etcd-client)")
            )


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server
