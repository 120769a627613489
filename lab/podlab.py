"""Pods in the lab: a small CNI runtime driving tunproxy-cni and the real reference plugins.

A "pod" is a network namespace of the lab (deleted with it). ``Runtime`` does
what containerd or CRI-O do for a pod sandbox, by the CNI spec: ``loopback``
on ``lo``, then every plugin of a network config list in order on ``ADD``
(each after the first gets the previous result as ``prevResult``), in order
with the cached result on ``CHECK``, and in reverse order on ``DEL``. Plugins
run inside the node's namespace (``ip netns exec``), found in a CNI bin
directory holding the reference plugins (Debian's containernetworking-plugins)
and tunproxy-cni linked as ``flannel``, exactly as a user installs it.

Used by ``python -m lab.demo --pods`` and tests/netns/test_cni.py; it
depends on lab.netns only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tunproxy

from .netns import Host, Lab, Netns, sh

REFERENCE_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")  # Debian's package, then upstream's tarball
REFERENCE_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
LOOPBACK_NETWORK = {"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"}


def reference_plugin_dir() -> Path | None:
    """Where the CNI reference plugins are installed, or None."""
    for directory in REFERENCE_PLUGIN_DIRS:
        if all((Path(directory) / name).is_file() for name in REFERENCE_PLUGINS):
            return Path(directory)
    return None


def make_bin_dir(
    directory: Path, plugins: tuple[str, ...] = REFERENCE_PLUGINS, name: str = "flannel"
) -> Path:
    """A CNI bin dir: the reference ``plugins`` linked in, and tunproxy-cni under ``name``.

    tunproxy-cni is a two-line shim running ``python -m tunproxy.cni`` from
    this checkout (what ``ln -s $(which tunproxy-cni) /opt/cni/bin/flannel``
    gives an installed tunproxy). Raises FileNotFoundError without the plugins.
    """
    source = reference_plugin_dir()
    if source is None:
        raise FileNotFoundError(f"no CNI reference plugins in {' or '.join(REFERENCE_PLUGIN_DIRS)}")
    directory.mkdir(parents=True, exist_ok=True)
    for plugin in plugins:
        (directory / plugin).symlink_to(source / plugin)
    root = Path(tunproxy.__file__).resolve().parent.parent
    shim = directory / name
    shim.write_text(f"#!/bin/sh\nPYTHONPATH='{root}' exec '{sys.executable}' -m tunproxy.cni \"$@\"\n")
    shim.chmod(0o755)
    return directory


def flannel_conflist(
    subnet_file: Path,
    data_dir: Path,
    ipam_data_dir: Path,
    name: str = "cbr0",
    cni_version: str = "1.0.0",
    portmap: bool = True,
) -> dict[str, Any]:
    """kube-flannel.yml's conflist, with the state paths moved into the lab (several labs share /var).

    The flannel entry's own ``ipam`` carries host-local's ``dataDir``: flannel
    merges it into the delegate's IPAM.
    """
    flannel: dict[str, Any] = {
        "type": "flannel",
        "subnetFile": str(subnet_file),
        "dataDir": str(data_dir),
        "ipam": {"dataDir": str(ipam_data_dir)},
        "delegate": {"hairpinMode": True, "isDefaultGateway": True},
    }
    plugins = [flannel]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"name": name, "cniVersion": cni_version, "plugins": plugins}


class CNIFailure(Exception):
    """A plugin exited non-zero: its CNI error object (``code``, ``msg``, ``details``) and stderr."""

    def __init__(self, plugin: str, command: str, error: dict[str, Any], stderr: str) -> None:
        self.plugin, self.command, self.error, self.stderr = plugin, command, error, stderr
        self.code = error.get("code")
        self.msg = str(error.get("msg", ""))
        super().__init__(
            f"{plugin} {command} failed: code {self.code}: {self.msg} {error.get('details', '')}"
        )


def add_pod_netns(lab: Lab, name: str) -> Netns:
    """An empty network namespace for a pod, deleted with the lab; ``lo`` is left to the loopback plugin."""
    ns = Netns(f"{lab.prefix}-{name}")
    sh("ip", "netns", "add", ns.name)
    lab.namespaces.append(ns)
    return ns


@dataclass
class Pod:
    """A pod sandbox: its namespace, container ID and, once added, the CNI result and its address."""

    lab: Lab
    name: str
    ns: Netns
    container_id: str
    node: Host
    result: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)  # each plugin's ADD result, in order

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.ns.name}"

    @property
    def address(self) -> str:
        """The pod's IPv4 address (no prefix length), from the ADD result."""
        assert self.result, f"pod {self.name} has not been added"
        return self.result["ips"][0]["address"].split("/")[0]

    def as_host(self) -> Host:
        """The pod seen as a lab Host, so ``ping``, ``wait_ping`` and ``lab.transfer`` work from it."""
        return Host(self.lab, self.name, self.ns, ipaddress.IPv4Address(self.address), iface="eth0")


@dataclass
class Runtime:
    """A node's container runtime for one network config list (see the module doc)."""

    node: Host
    bin_dir: Path
    network: dict[str, Any]
    ifname: str = "eth0"
    timeout: float = 60
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)  # libcni's results cache

    def exec_plugin(
        self, plugin: str, command: str, config: dict[str, Any], pod: Pod, ifname: str | None = None
    ) -> dict[str, Any] | None:
        """Run one plugin as the CNI spec says; its JSON result (None if it printed none) or CNIFailure."""
        env = dict(
            os.environ,
            CNI_COMMAND=command,
            CNI_CONTAINERID=pod.container_id,
            CNI_NETNS=pod.netns_path,
            CNI_IFNAME=ifname or self.ifname,
            CNI_PATH=str(self.bin_dir),
        )
        proc = subprocess.run(
            self.node.ns.cmd(str(self.bin_dir / plugin)),
            input=json.dumps(config),
            capture_output=True,
            text=True,
            env=env,
            timeout=self.timeout,
            check=False,
        )
        if proc.returncode != 0:
            try:
                error = json.loads(proc.stdout)
            except ValueError:
                error = {"code": None, "msg": f"exit {proc.returncode}, stdout {proc.stdout!r}"}
            raise CNIFailure(plugin, command, error, proc.stderr)
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def plugin_config(
        self, index: int, prev_result: dict[str, Any] | None, runtime_config: dict[str, Any]
    ) -> dict[str, Any]:
        """What libcni hands plugin ``index``: its config, the list's name and version, capabilities."""
        plugin = self.network["plugins"][index]
        config = dict(plugin, name=self.network["name"], cniVersion=self.network["cniVersion"])
        wanted = {k: v for k, v in runtime_config.items() if plugin.get("capabilities", {}).get(k)}
        if wanted:
            config["runtimeConfig"] = wanted
        if prev_result is not None:
            config["prevResult"] = prev_result
        return config

    def add(self, pod: Pod, runtime_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """ADD: loopback on lo, then the list in order; the final result (also kept in ``pod.result``)."""
        self.exec_plugin("loopback", "ADD", LOOPBACK_NETWORK, pod, ifname="lo")
        result: dict[str, Any] | None = None
        runtime_config = runtime_config or {}
        pod.results = []
        # Cached before the first plugin runs: after a failed ADD the runtime still owes a DEL.
        self.cache[pod.container_id] = {"result": None, "runtimeConfig": runtime_config}
        for i, plugin in enumerate(self.network["plugins"]):
            config = self.plugin_config(i, result, runtime_config)
            result = self.exec_plugin(plugin["type"], "ADD", config, pod)
            assert result is not None, f"{plugin['type']} ADD printed no result"
            pod.results.append(result)
        assert result is not None
        self.cache[pod.container_id]["result"] = result
        pod.result = result
        return result

    def check(self, pod: Pod) -> None:
        """CHECK: every plugin in order, each with the cached ADD result as prevResult."""
        cached = self.cache[pod.container_id]
        for i, plugin in enumerate(self.network["plugins"]):
            config = self.plugin_config(i, cached["result"], cached["runtimeConfig"])
            self.exec_plugin(plugin["type"], "CHECK", config, pod)

    def delete(self, pod: Pod) -> None:
        """DEL: the list in reverse (with the cached result when there is one), then loopback."""
        cached = self.cache.get(pod.container_id, {"result": None, "runtimeConfig": {}})
        for i in reversed(range(len(self.network["plugins"]))):
            config = self.plugin_config(i, cached["result"], cached["runtimeConfig"])
            self.exec_plugin(self.network["plugins"][i]["type"], "DEL", config, pod)
        self.exec_plugin("loopback", "DEL", LOOPBACK_NETWORK, pod, ifname="lo")
        self.cache.pop(pod.container_id, None)


def wait_subnet_file(path: Path, timeout: float = 10) -> str:
    """subnet.env's text once the daemon has written it (it logs its lease just before)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {timeout:.0f}s")
        time.sleep(0.05)
    return path.read_text()


def new_pod(lab: Lab, node: Host, name: str) -> Pod:
    """A pod namespace on ``node`` with a unique container ID (not yet added)."""
    ns = add_pod_netns(lab, name)
    return Pod(lab, name, ns, f"{lab.prefix}-{name}-{os.getpid()}", node)


def leftovers(node: Host, ipam_dir: Path, data_dir: Path, container_ids: list[str]) -> list[str]:
    """What pods left behind on a node: veths on a bridge, host-local reservations, stored configs,
    iptables rules naming a container. Empty when DEL cleaned up everything.

    host-local's own bookkeeping (``last_reserved_ip.*``, ``lock``) and the
    bridge ``cni0`` stay by design of the reference plugins; they are no pod's.
    """
    found = []
    links = json.loads(node.ns.run("ip", "-j", "link", "show", "type", "veth").stdout or "[]")
    found += [f"veth {link['ifname']} on {link['master']}" for link in links if link.get("master")]
    if ipam_dir.exists():
        for path in ipam_dir.rglob("*"):
            try:
                ipaddress.ip_address(path.name)
            except ValueError:
                continue
            found.append(f"IPAM reservation {path}")
    if data_dir.exists():
        found += [f"stored config {path}" for path in data_dir.iterdir()]
    rules = node.ns.run("iptables-save").stdout
    found += [
        f"iptables rule {line}"
        for line in rules.splitlines()
        if any(re.search(rf"\b{re.escape(cid)}\b", line) for cid in container_ids)
    ]
    return found
