"""Fixtures for the namespace tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.etcd import EtcdServer
from lab.hosts import SEGMENT, UNDERLAY
from lab.netns import Host, Lab, Process

from .labkit import HOSTS, etcd_in_lab, start_etcd


@pytest.fixture
def etcd_mesh_factory(lab: Lab) -> Iterator[Callable[..., Any]]:
    """Builds three hosts on br0 leasing from an etcd in the lab; stops etcd afterwards."""
    servers: list[EtcdServer] = []

    def build(backend: str, **options: Any) -> tuple[EtcdServer, dict[str, Host], dict[str, Process], dict]:
        lab.segment(SEGMENT, UNDERLAY)
        server = etcd_in_lab(lab, backend, **options)
        servers.append(server)
        nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in HOSTS.items()}
        procs, subnets = {}, {}
        for name, host in nodes.items():
            procs[name], subnets[name] = start_etcd(host, server)
        return server, nodes, procs, subnets

    yield build
    for proc in lab.processes:  # tunproxy first, so it does not spend the teardown retrying etcd
        proc.stop(timeout=5)
    for server in servers:
        server.close()
