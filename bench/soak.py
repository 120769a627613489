"""``python -m bench.soak``: traffic for a while as peers join, leave and restart, and leases vanish.

Two stable hosts (s1, s2) run tunproxy (udp backend, leases in a real etcd in
the lab) for the whole run, with ping at 10/s and a bounded-rate TCP stream
between them. Around them, every ``--period`` seconds one thing happens to the
churn hosts (c1..c4), chosen by a seeded RNG: a host joins, leaves (SIGTERM;
its lease stays until its TTL, as flannel's does), restarts, or has its lease
deleted from etcd behind its back (the daemon acquires one again). Each second
the stable daemons' RSS, open file descriptors and threads (from /proc; asyncio
tasks cannot be counted from outside a process) are sampled.

At the end the churn stops, keys of hosts that are gone are deleted (their TTL
would do it later), and each stable daemon's routes, replayed from its log
("peer added/removed"), must equal etcd's leases less its own: no route left
stale. The figures: slopes (least squares, over the second half, to leave out
warm-up) per minute, deaths, stale routes, pings lost; JSON and a PNG under
bench/results/soak-<timestamp>.*. ``make soak`` runs ten minutes; CI runs two
(tests/netns/test_soak.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.etcd import EtcdServer
from lab.hosts import ETCD_ADDRESS, NETWORK, SEGMENT, UNDERLAY, underlay_address
from lab.netns import Host, Lab, Process

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SUBNETS = "/coreos.com/network/subnets/"
STABLE = {"s1": underlay_address(1), "s2": underlay_address(2)}
CHURN = {f"c{i}": underlay_address(10 + i) for i in range(1, 5)}
# Leases live 1 min and are renewed every 20 s: renewals happen all through the run.
DAEMON_FLAGS = ("--subnet-lease-ttl", "1", "--subnet-lease-renew-margin", "0.66", "--stats-interval", "0")
ACTIONS = ("join", "leave", "restart", "delete-lease")


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int


def sample(pid: int, t: float) -> Sample | None:
    """RSS (KiB), open fds and threads of ``pid`` from /proc; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return Sample(t, int(fields["VmRSS"].split()[0]), fds, int(fields["Threads"]))


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per minute; 0 for fewer than 2."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx


def routes_from_log(text: str) -> set[str]:
    """The peer subnets a daemon routes now, replayed from its "peer added/removed: <subnet>" lines."""
    routed: set[str] = set()
    for what, subnet in re.findall(r"peer (added|removed): (\S+)", text):
        if what == "added":
            routed.add(subnet)
        else:
            routed.discard(subnet)
    return routed


@dataclass
class Soak:
    lab: Lab
    etcd: EtcdServer
    seconds: float
    period: float
    rng: random.Random
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: dict[str, Process] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    actions: list[dict[str, Any]] = field(default_factory=list)
    deaths: list[str] = field(default_factory=list)

    def start(self, name: str) -> Process:
        proc = self.hosts[name].tunproxy("--etcd-endpoints", self.etcd.endpoint, *DAEMON_FLAGS)
        self.procs[name] = proc
        return proc

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        code = proc.stop(timeout=10)
        if code != 0:
            self.deaths.append(f"{name} exited {code} on SIGTERM: {proc.output()[-500:]}")

    def keys(self) -> dict[str, str]:
        """subnet -> PublicIP of every lease in etcd."""
        out = self.etcd.etcdctl("get", "--prefix", SUBNETS).stdout.splitlines()
        keys = {}
        for key, value in zip(out[::2], out[1::2], strict=False):
            keys[key.removeprefix(SUBNETS).replace("-", "/")] = json.loads(value)["PublicIP"]
        return keys

    def act(self, now: float) -> None:
        running = [n for n in CHURN if n in self.procs]
        stopped = [n for n in CHURN if n not in self.procs]
        action = self.rng.choice(ACTIONS)
        if action == "join" and not stopped or action in ("leave", "restart") and not running:
            action = "join" if stopped else "restart"
        if action == "delete-lease":
            keys = [
                k for k, ip in self.keys().items() if ip in {self.hosts[n].address.exploded for n in running}
            ]
            if not keys:
                return
            target = self.rng.choice(keys)
            self.etcd.etcdctl("del", SUBNETS + target.replace("/", "-"))
        else:
            target = self.rng.choice(stopped if action == "join" else running)
            if action in ("leave", "restart"):
                self.stop(target)
            if action in ("join", "restart"):
                self.start(target)
        self.actions.append({"t": round(now, 1), "action": action, "target": target})

    def check_alive(self) -> None:
        for name, proc in list(self.procs.items()):
            if not proc.alive():
                self.deaths.append(f"{name} died (exit {proc.popen.returncode}): {proc.output()[-500:]}")
                del self.procs[name]
                if name in STABLE:
                    raise RuntimeError(self.deaths[-1])
                self.start(name)

    def run(self) -> dict[str, Any]:
        for name in STABLE:
            self.start(name).wait_for("our subnet is", timeout=30)
        subnets = {n: re.findall(r"our subnet is (\S+)", self.procs[n].output())[-1] for n in STABLE}
        s1, s2 = self.hosts["s1"], self.hosts["s2"]
        target = subnets["s2"].split("/")[0]
        s1.wait_ping(target, timeout=15)
        pinger = s1.start(
            "ping", "-n", "-q", "-i", "0.1", "-W", "2", "-c", str(int(self.seconds * 10)), target
        )
        server = s2.start("iperf3", "-s", "-1", "--forceflush", "-B", target, name="iperf3")
        server.wait_for("Server listening")
        stream = s1.start(
            "iperf3", "-c", target, "-b", "20M", "-t", str(int(self.seconds)), "--forceflush", name="stream"
        )
        begin = time.monotonic()
        next_action = begin + self.period
        while (now := time.monotonic()) - begin < self.seconds:
            for name in STABLE:
                got = sample(self.procs[name].pid, now - begin)
                if got:
                    self.samples.setdefault(name, []).append(got)
            self.check_alive()
            if now >= next_action:
                self.act(now - begin)
                next_action += self.period
            time.sleep(max(0.0, 1 - (time.monotonic() - now)))
        pinger.popen.wait(30)
        stream.popen.wait(30)
        return self.finish(pinger, stream, subnets)

    def finish(self, pinger: Process, stream: Process, subnets: dict[str, str]) -> dict[str, Any]:
        for name in [n for n in CHURN if n in self.procs]:
            self.stop(name)
        live = {self.hosts[n].address.exploded for n in STABLE}
        for subnet, ip in self.keys().items():
            if ip not in live:  # a host that left: its TTL would delete the key a minute from now
                self.etcd.etcdctl("del", SUBNETS + subnet.replace("/", "-"))
        stale: dict[str, list[str]] = {}
        deadline = time.monotonic() + 20
        while True:
            keys = self.keys()
            stale = {}
            for name in STABLE:
                want = {s for s in keys if s != subnets[name]}
                got = routes_from_log(self.procs[name].output())
                if got != want:
                    stale[name] = sorted(got ^ want)
            if not stale or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for name in STABLE:
            if not self.procs[name].alive():
                self.deaths.append(f"{name} died: {self.procs[name].output()[-500:]}")
        found = re.search(r"(\d+) packets transmitted, (\d+) received", pinger.output())
        sent, received = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
        tcp = re.findall(r"([\d.]+) (\w)bits/sec\s+(\d+)\s+sender", stream.output())
        slopes: dict[str, dict[str, float]] = {}
        for name, points in self.samples.items():
            half = points[len(points) // 2 :]
            slopes[name] = {
                "rss_kib_per_min": round(slope_per_minute([(s.t, s.rss_kib) for s in half]), 2),
                "fds_per_min": round(slope_per_minute([(s.t, s.fds) for s in half]), 3),
                "threads_per_min": round(slope_per_minute([(s.t, s.threads) for s in half]), 3),
                "rss_kib_first": points[0].rss_kib,
                "rss_kib_last": points[-1].rss_kib,
                "fds_first": points[0].fds,
                "fds_last": points[-1].fds,
                "fds_max": max(s.fds for s in points),
                "threads_max": max(s.threads for s in points),
            }
        counts = {a: sum(1 for x in self.actions if x["action"] == a) for a in ACTIONS}
        return {
            "seconds": self.seconds,
            "period_s": self.period,
            "actions": counts,
            "slopes": slopes,
            "stale_routes": stale,
            "deaths": self.deaths,
            "pings_sent": sent,
            "pings_lost": sent - received,
            "tcp_sender_retransmits": int(tcp[-1][2]) if tcp else None,
            "samples": {n: [s.__dict__ for s in pts] for n, pts in self.samples.items()},
            "log": self.actions,
        }


def soak(seconds: float, period: float = 4.0, seed: int = 1) -> dict[str, Any]:
    """Run the soak; the result dict (see the module docstring). Cleans up every namespace and process."""
    with Lab() as lab:
        lab.segment(SEGMENT, UNDERLAY)
        lab.switch_address(SEGMENT, ETCD_ADDRESS)
        etcd = EtcdServer(address=ETCD_ADDRESS, ns=lab.switch, workdir=lab.workdir).start()
        try:
            config = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": "udp"}}
            etcd.etcdctl("put", "/coreos.com/network/config", json.dumps(config))
            run = Soak(lab, etcd, seconds, period, random.Random(seed))
            for name, ip in {**STABLE, **CHURN}.items():
                run.hosts[name] = lab.add_host(name, SEGMENT, ip)
            try:
                return run.run()
            finally:
                for proc in list(run.procs.values()):
                    proc.stop(timeout=5)
        finally:
            etcd.close()


def table(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['seconds']:g} s, an action every {result['period_s']:g} s: "
        + ", ".join(f"{k} {v}" for k, v in result["actions"].items()),
        "| daemon | RSS KiB first -> last | RSS KiB/min | fds first -> last (max) | fds/min | threads max |"
        " threads/min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["slopes"].items():
        lines.append(
            f"| {name} | {s['rss_kib_first']} -> {s['rss_kib_last']} | {s['rss_kib_per_min']:+.1f} | "
            f"{s['fds_first']} -> {s['fds_last']} ({s['fds_max']}) | {s['fds_per_min']:+.2f} | "
            f"{s['threads_max']} | {s['threads_per_min']:+.2f} |"
        )
    lines.append(
        f"pings lost {result['pings_lost']} of {result['pings_sent']}; TCP retransmits "
        f"{result['tcp_sender_retransmits']}; stale routes {result['stale_routes'] or 'none'}; "
        f"deaths {len(result['deaths'])}"
    )
    return "\n".join(lines)


def save(result: dict[str, Any], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    for name, points in result["samples"].items():
        t = [p["t"] for p in points]
        axes[0].plot(t, [p["rss_kib"] / 1024 for p in points], label=name)
        axes[1].plot(t, [p["fds"] for p in points], label=name)
        axes[2].plot(t, [p["threads"] for p in points], label=name)
    for ax, title in zip(axes, ("RSS (MiB)", "open file descriptors", "threads"), strict=True):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"tunproxy soak: {result['seconds']:g} s of churn every {result['period_s']:g} s")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="how long (default 600)")
    parser.add_argument("--period", type=float, default=4, help="seconds between churn actions (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.seconds < 10 or args.period <= 0:
        print("soak: --seconds must be at least 10 and --period positive", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup on SIGTERM too
    result = soak(args.seconds, args.period, args.seed)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"soak-{dt.datetime.now(dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    save(result, stem)
    print(table(result))
    print(f"wrote {stem}.json and {stem}.png")
    return 0 if not result["deaths"] and not result["stale_routes"] else 1


if __name__ == "__main__":
    sys.exit(main())
