"""``make demo``: three hosts in network namespaces, one overlay, every pair talking.

Builds the lab (lab/hosts.py: a bridge on 192.0.2.0/24, hosts .11 .12 .13), starts
``tunproxy run`` in each (static peers, or etcd with ``--etcd`` when it is
installed), pings every pair across the overlay, moves data with iperf3, prints
each daemon's ``tunproxy status``, and deletes everything, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

from .etcd import EtcdServer
from .hosts import ETCD_ADDRESS, HOSTS, NETWORK, SEGMENT, UNDERLAY
from .netns import Lab, cleanup_stale


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def subnet_file(lab: Lab, name: str) -> str:
    """Where Host.tunproxy has the daemon write subnet.env: it also names its control socket."""
    return str(lab.workdir / f"{name}-subnet.env")


def overlay_address(subnet: str) -> str:
    return subnet.split("/")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo")
    parser.add_argument("--etcd", action="store_true", help="take leases from a real etcd in the lab")
    parser.add_argument("--backend", default="udp", choices=("udp", "vxlan", "host-gw"))
    parser.add_argument("--seconds", type=int, default=3, help="iperf3 duration")
    parser.add_argument(
        "--pods", action="store_true", help="pods attached through tunproxy-cni (the CNI plugin) on each host"
    )
    args = parser.parse_args(argv)
    if args.pods:
        if args.etcd:
            parser.error("--pods runs with static peers; drop --etcd")
        from .demo_pods import run as run_pods

        return run_pods(args.backend)
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces); try: sudo make demo", file=sys.stderr)
        return 2
    if args.etcd and not shutil.which("etcd"):
        print("demo: --etcd needs etcd (apt install etcd-server etcd-client)", file=sys.stderr)
        return 2
    cleanup_stale("tpdemo")
    failures = 0
    with Lab(prefix="tpdemo") as lab:
        lab.segment(SEGMENT, UNDERLAY)
        hosts = {name: lab.add_host(name, SEGMENT, spec.public_ip) for name, spec in HOSTS.items()}
        say(f"lab: {len(hosts)} hosts on bridge {UNDERLAY}, overlay {NETWORK}, backend {args.backend}")
        etcd = None
        if args.etcd:
            lab.switch_address(SEGMENT, ETCD_ADDRESS)
            etcd = EtcdServer(address=ETCD_ADDRESS, ns=lab.switch, workdir=lab.workdir).start()
            config = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": args.backend}}
            etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(config))
            say(f"etcd at {etcd.endpoint}; config {json.dumps(config)}")
        try:
            procs = {}
            for name, host in hosts.items():
                if etcd:
                    procs[name] = host.tunproxy("--etcd-endpoints", etcd.endpoint)
                else:
                    peers = [f"--peer={spec.peer}" for other, spec in HOSTS.items() if other != name]
                    subnet = HOSTS[name].subnet
                    procs[name] = host.tunproxy(
                        "--network", NETWORK, "--subnet", subnet, "--backend", args.backend, *peers
                    )
            subnets = {}
            for name, proc in procs.items():
                proc.wait_for("our subnet is", timeout=20)
                subnets[name] = proc.output().split("our subnet is ")[1].split()[0]
                say(f"{name} ({hosts[name].address}) leased {subnets[name]}")

            say("ping every pair across the overlay:")
            for a, b in itertools.permutations(hosts, 2):
                target = overlay_address(subnets[b])
                try:
                    hosts[a].wait_ping(target, timeout=10)
                    rtt = hosts[a].ping(target, count=3).stdout.strip().splitlines()[-1]
                    say(f"  {a} -> {b} {target}: ok  {rtt.split('=')[-1].strip()}")
                except TimeoutError as e:
                    failures += 1
                    say(f"  {a} -> {b} {target}: FAILED ({e})")

            server, client = hosts["h2"], hosts["h1"]
            server.start("iperf3", "-s", "-1", "-B", overlay_address(subnets["h2"]), name="iperf3")
            time.sleep(0.5)
            result = client.ns.run(
                "iperf3",
                "-c",
                overlay_address(subnets["h2"]),
                "-t",
                str(args.seconds),
                "-J",
                check=False,
                timeout=args.seconds + 20,
            )
            try:
                end = json.loads(result.stdout)["end"]
                gbits = end["sum_received"]["bits_per_second"] / 1e9
                moved = end["sum_received"]["bytes"] / 1e6
                say(
                    f"iperf3 h1 -> h2 over the overlay: {moved:.0f} MB in {args.seconds}s, "
                    f"{gbits:.2f} Gbit/s, "
                    f"{end['sum_sent'].get('retransmits', 0)} retransmits"
                )
            except (ValueError, KeyError):
                failures += 1
                say(f"iperf3 FAILED: {result.stdout[-400:]}{result.stderr[-400:]}")

            for name in procs:
                status = subprocess.run(
                    [sys.executable, "-m", "tunproxy", "status", "--subnet-file", subnet_file(lab, name)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                say(f"tunproxy status on {name}:")
                for line in (status.stdout or status.stderr).rstrip().splitlines():
                    print(f"    {line}", flush=True)
                failures += status.returncode != 0
            for name, proc in procs.items():
                proc.stop()
                say(f"{name} exited {proc.popen.returncode}")
                failures += proc.popen.returncode != 0
        finally:
            if etcd:
                etcd.close()
    say("all namespaces deleted")
    say("OK" if not failures else f"{failures} FAILURE(S)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
