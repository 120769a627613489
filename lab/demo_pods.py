"""``make demo-pods``: pods on three tunproxy hosts, attached by tunproxy-cni as a runtime would.

Three hosts (namespaces on a bridge) run ``tunproxy run``; each gets two pods
(namespaces) attached through the CNI network config list a node would use
(tunproxy-cni linked as ``flannel``, then ``portmap``) with the real
``bridge``, ``host-local``, ``loopback`` and ``portmap`` plugins. Every pod
pings every other pod, one pod sends data over TCP to a pod on another host,
then every pod is deleted (CNI DEL) and the demo shows nothing is left: no
veth, no IPAM reservation, no stored config, no iptables rule. Everything is
deleted, also on failure or Ctrl-C.
"""

from __future__ import annotations

import itertools
import os
import sys

from .hosts import HOSTS, NETWORK, SEGMENT, UNDERLAY
from .netns import Lab, cleanup_stale, transfer
from .podlab import (
    CNIFailure,
    Pod,
    Runtime,
    flannel_conflist,
    leftovers,
    make_bin_dir,
    new_pod,
    reference_plugin_dir,
    wait_subnet_file,
)

PODS_PER_HOST = 2


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def run(backend: str = "udp") -> int:
    """The pods demo; 0 if every check passed. Needs root and the CNI reference plugins."""
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces); try: sudo make demo-pods", file=sys.stderr)
        return 2
    if reference_plugin_dir() is None:
        print("demo: --pods needs the CNI plugins (apt install containernetworking-plugins)", file=sys.stderr)
        return 2
    cleanup_stale("tppods")
    try:
        failures = _run(backend)
    except KeyboardInterrupt:
        say("interrupted; every namespace and process of the demo deleted")
        return 130
    except (CNIFailure, RuntimeError, TimeoutError) as e:
        say(f"FAILED: {e}")
        say("every namespace and process of the demo deleted")
        return 1
    say("all namespaces deleted")
    say("OK" if not failures else f"{failures} FAILURE(S)")
    return 1 if failures else 0


def _run(backend: str) -> int:
    failures = 0
    with Lab(prefix="tppods") as lab:
        lab.segment(SEGMENT, UNDERLAY)
        hosts = {name: lab.add_host(name, SEGMENT, spec.public_ip) for name, spec in HOSTS.items()}
        say(f"lab: {len(hosts)} hosts on bridge {UNDERLAY}, overlay {NETWORK}, backend {backend}")
        procs = {}
        for name, host in hosts.items():
            peers = [f"--peer={spec.peer}" for other, spec in HOSTS.items() if other != name]
            procs[name] = host.tunproxy(
                "--network", NETWORK, "--subnet", HOSTS[name].subnet, "--backend", backend, *peers
            )
        for proc in procs.values():
            proc.wait_for("our subnet is", timeout=20)
        bin_dir = make_bin_dir(lab.workdir / "cni-bin")
        say(f"CNI bin dir {bin_dir}: tunproxy-cni as 'flannel', reference bridge host-local loopback portmap")

        runtimes: dict[str, Runtime] = {}
        pods: list[Pod] = []
        try:
            for name, host in hosts.items():
                subnet_file = lab.workdir / f"{name}-subnet.env"
                say(f"{name} subnet.env: {' '.join(wait_subnet_file(subnet_file).split())}")
                runtimes[name] = Runtime(
                    host,
                    bin_dir,
                    flannel_conflist(subnet_file, lab.workdir / f"{name}-cni", lab.workdir / f"{name}-ipam"),
                )
                for i in range(PODS_PER_HOST):
                    pod = new_pod(lab, host, f"{name}p{i + 1}")
                    pods.append(pod)
                    result = runtimes[name].add(pod)
                    mtu = pod.ns.run("cat", "/sys/class/net/eth0/mtu").stdout.strip()
                    say(
                        f"  ADD {pod.name} on {name}: {result['ips'][0]['address']} "
                        f"gw {result['ips'][0].get('gateway')}, eth0 mtu {mtu}"
                    )

            say(f"ping every pod from every other pod ({len(pods) * (len(pods) - 1)} pairs):")
            for a, b in itertools.permutations(pods, 2):
                try:
                    a.as_host().wait_ping(b.address, timeout=10)
                except TimeoutError as e:
                    failures += 1
                    say(f"  {a.name} -> {b.name} {b.address}: FAILED ({e})")
            if not failures:
                say("  all pairs ok")

            src, dst = pods[0], pods[-1]
            sent, received = transfer(src.as_host(), dst.as_host(), dst.address, 8 << 20, port=5201)
            ok = sent == received
            failures += not ok
            say(
                f"TCP {src.name} ({src.address}) -> {dst.name} ({dst.address}): 8 MiB "
                f"{'arrived intact' if ok else f'FAILED: sent {sent}, received {received}'}"
            )

            for pod in pods:
                runtimes[pod.node.name].delete(pod)
            say(f"DEL of all {len(pods)} pods done")
        finally:
            for pod in pods:  # on failure: undo what was added, so DEL runs whatever happened
                if pod.container_id in runtimes[pod.node.name].cache:
                    runtimes[pod.node.name].delete(pod)

        for name, host in hosts.items():
            left = leftovers(
                host,
                lab.workdir / f"{name}-ipam",
                lab.workdir / f"{name}-cni",
                [p.container_id for p in pods],
            )
            failures += len(left)
            say(f"{name} after DEL: {'nothing left' if not left else 'LEFT: ' + '; '.join(left)}")

        for proc in procs.values():
            failures += proc.stop() != 0
    return failures
