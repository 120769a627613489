"""The bench's I/O: two namespaces on one veth, each variant's daemons, iperf3, sockperf, ping, CPU times.

One lab serves the whole run. For each (round, variant) the variant's two
tunproxy daemons are started, its tests run back to back, and the daemons
are stopped again (SIGTERM, exit 0 expected, their ``stats:`` line kept),
so the next variant finds the hosts as the lab made them; whatever a
backend leaves behind is recorded and removed. Each iperf3 server is a
one-shot (``-s -1``) and each sockperf server lives for one test, so a test
that dies cannot wedge the next one. Around every test the harness reads
the daemons' CPU time (/proc), their own drop counters (the control socket,
what ``tunproxy status --json`` shows) and the kernel's drop counters.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lab import hosts as plan
from lab.hosts import NETWORK
from lab.netns import Host, Lab, Process, cleanup_dead_labs, sh

from . import report
from .plan import BY_NAME, TESTS, Step, Variant, schedule

PREFIX = "tpbench"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = plan.pairs({name: plan.HOSTS[name] for name in ("h1", "h2")})  # {name: (public_ip, subnet)}
IPERF_PORT = "5201"
SOCKPERF_PORT = "11111"
UDP_PAYLOAD = 64  # the flood ("udp"): packets per second is what it measures
BULK_PAYLOAD = 1400  # "udpbulk": fits every variant's overlay MTU (vxlan 1450) with its 28 header bytes
RR_MESSAGE = 64  # sockperf ping-pong message size
CLK_TCK = os.sysconf("SC_CLK_TCK")
# A Prometheus stand-in: GET /metrics once a second, as a scrape_interval of 1s would.
SCRAPER = (
    "import time, urllib.request\n"
    "while True:\n"
    "    try:\n"
    "        urllib.request.urlopen('{url}', timeout=2).read()\n"
    "        print('scraped', flush=True)\n"
    "    except OSError as e:\n"
    "        print('failed', e, flush=True)\n"
    "    time.sleep(1)\n"
)


@dataclass(frozen=True)
class Config:
    variants: tuple[str, ...]
    rounds: int
    seconds: int  # each iperf3 TCP test
    udp_seconds: int  # each UDP test (udp, udpbulk) and the sockperf ping-pong (rr)
    ping_count: int
    ping_interval: float = 0.05
    tests: tuple[str, ...] = TESTS
    quick: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- /proc and the machine ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def machine_info() -> dict[str, Any]:
    import tunproxy

    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    iperf = sh("iperf3", "--version", check=False).stdout.split()
    commit = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD", check=False).stdout.strip() or None
    # Uncommitted changes to tunproxy/ mean the figures are of a tree no commit holds.
    dirty = sh("git", "-C", ROOT, "status", "--porcelain", "--", "tunproxy", check=False).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "python": sys.version.replace("\n", " "),
        "iperf3": iperf[1] if len(iperf) > 1 else "?",
        "tunproxy": tunproxy.__version__,
        "git_commit": commit,
        "tunproxy_uncommitted_changes": changed,
        "loadavg_start": load,
    }


# --- parsing tool output (pure) -------------------------------------------------------------------


def parse_iperf_tcp(doc: dict[str, Any]) -> dict[str, Any]:
    end = doc["end"]
    sent, received = end["sum_sent"], end["sum_received"]
    return {
        "streams": doc["start"]["test_start"]["num_streams"],
        "sent_bytes": sent["bytes"],
        "received_bytes": received["bytes"],
        "sent_bps": sent["bits_per_second"],
        "received_bps": received["bits_per_second"],
        "iperf_seconds": received["seconds"],
        "retransmits": sent.get("retransmits"),
        "interval_bps": [round(i["sum"]["bits_per_second"]) for i in doc.get("intervals", [])],
        "iperf3_cpu": end.get("cpu_utilization_percent"),
    }


def parse_iperf_udp(doc: dict[str, Any], payload: int = UDP_PAYLOAD) -> dict[str, Any]:
    """iperf3 -u -J's figures; ``payload`` is the datagram size (-l) in bytes."""
    end = doc["end"]
    sent, received = end["sum_sent"], end["sum_received"]
    # The receiver counts "packets" by sequence number: delivered = packets - lost.
    delivered = received["packets"] - received["lost_packets"]
    seconds = received["seconds"] or sent["seconds"]
    pps = delivered / seconds if seconds else None
    return {
        "payload_bytes": payload,
        "sent_packets": sent["packets"],
        "sent_pps": sent["packets"] / sent["seconds"] if sent["seconds"] else None,
        "packets": received["packets"],
        "lost_packets": received["lost_packets"],
        "lost_percent": received["lost_percent"],
        "delivered_packets": delivered,
        "delivered_pps": pps,
        "delivered_bps": None if pps is None else pps * payload * 8,  # payload bits, as iperf3 counts
        "delivered_bytes": delivered * payload,
        "received_bytes": received["bytes"],
        "iperf_seconds": seconds,
        "jitter_ms": received.get("jitter_ms"),
        "interval_packets_sent": [i["sum"].get("packets") for i in doc.get("intervals", [])],
        "iperf3_cpu": end.get("cpu_utilization_percent"),
    }


_RTT = re.compile(r"time=([\d.]+) ms")
_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")


def parse_ping(text: str) -> dict[str, Any]:
    rtts = [float(x) for x in _RTT.findall(text)]
    counts = _COUNTS.search(text)
    stat = report.summarize(rtts)
    return {
        "rtt_ms": rtts,
        "transmitted": int(counts.group(1)) if counts else None,
        "received": int(counts.group(2)) if counts else len(rtts),
        "median_ms": stat.median if stat else None,
        "min_ms": stat.lo if stat else None,
        "max_ms": stat.hi if stat else None,
        "mean_ms": sum(rtts) / len(rtts) if rtts else None,
    }


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SP_AVG = re.compile(r"avg-(rtt|latency)=([\d.]+) \(std-dev=([\d.]+)\)")
_SP_PERCENTILE = re.compile(r"percentile ([\d.]+) =\s*([\d.]+)")
_SP_EXTREME = re.compile(r"<(MAX|MIN)> observation =\s*([\d.]+)")
_SP_MESSAGES = re.compile(
    r"\[(Total Run|Valid Duration)\] RunTime=([\d.]+) sec;.*SentMessages=(\d+); ReceivedMessages=(\d+)"
)
_SP_DROPPED = re.compile(
    r"# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)"
)
_SP_OBSERVATIONS = re.compile(r"Total (\d+) observations")


def parse_sockperf(text: str) -> dict[str, Any]:
    """The figures of ``sockperf ping-pong`` (3.x) output, in microseconds.

    With ``--full-rtt`` sockperf reports round trips (``avg-rtt``), without it
    half of them (``avg-latency``); ``round_trip`` says which. Percentiles are
    sockperf's own over the valid duration (warm-up excluded); ``p50_us``,
    ``p99_us``, ``p999_us`` are its 50.000, 99.000 and 99.900 lines. Message
    counts are of the whole run (``total_*``, what moved while the CPU was
    sampled) and of the valid duration. Raises ValueError naming what is
    missing when the output holds no statistics (sockperf failed or timed out).
    """
    text = _ANSI.sub("", text)
    avg = _SP_AVG.search(text)
    if avg is None:
        tail = " | ".join(text.strip().splitlines()[-2:])[-200:]
        raise ValueError(f"sockperf printed no avg-rtt line: {tail or 'no output'}")
    percentiles = {float(p): float(v) for p, v in _SP_PERCENTILE.findall(text)}
    extremes = dict(_SP_EXTREME.findall(text))
    runs = {m.group(1): m for m in _SP_MESSAGES.finditer(text)}
    dropped = _SP_DROPPED.search(text)
    observations = _SP_OBSERVATIONS.search(text)
    total, valid = runs.get("Total Run"), runs.get("Valid Duration")
    return {
        "round_trip": avg.group(1) == "rtt",
        "mean_us": float(avg.group(2)),
        "std_dev_us": float(avg.group(3)),
        "p50_us": percentiles.get(50.0),
        "p99_us": percentiles.get(99.0),
        "p999_us": percentiles.get(99.9),
        "max_us": float(extremes["MAX"]) if "MAX" in extremes else None,
        "min_us": float(extremes["MIN"]) if "MIN" in extremes else None,
        "percentiles_us": {f"{p:g}": v for p, v in sorted(percentiles.items())},
        "observations": int(observations.group(1)) if observations else None,
        "total_seconds": float(total.group(2)) if total else None,
        "total_sent_messages": int(total.group(3)) if total else None,
        "total_received_messages": int(total.group(4)) if total else None,
        "valid_seconds": float(valid.group(2)) if valid else None,
        "valid_sent_messages": int(valid.group(3)) if valid else None,
        "valid_received_messages": int(valid.group(4)) if valid else None,
        "dropped_messages": int(dropped.group(1)) if dropped else None,
        "duplicated_messages": int(dropped.group(2)) if dropped else None,
        "out_of_order_messages": int(dropped.group(3)) if dropped else None,
    }


def daemon_drop_counters(doc: dict[str, Any]) -> dict[str, int] | None:
    """The drop counters (reason -> total) of a ``tunproxy status --json`` document.

    None when the daemon has no fast path counting them (vxlan and host-gw:
    the kernel moves the packets), so "no counter" never reads as "no drop".
    """
    if not doc.get("counters"):
        return None
    return {reason: int(d["total"]) for reason, d in (doc.get("drops") or {}).items()}


def drop_deltas(
    before: dict[str, dict[str, int] | None], after: dict[str, dict[str, int] | None]
) -> tuple[dict[str, dict[str, int] | None], int | None]:
    """Per host, the drop counters that grew during a test; and their sum (None if any host is unknown)."""
    by_host: dict[str, dict[str, int] | None] = {}
    for host in after:
        b, a = before.get(host), after[host]
        by_host[host] = None if a is None or b is None else counter_deltas(b, a)
    if not by_host or any(d is None for d in by_host.values()):
        return by_host, None
    return by_host, sum(n for d in by_host.values() for n in (d or {}).values())


# The daemon's own UDP sockets: sk_drops (ss's skmem "d"), a part of /proc/net/snmp's RcvbufErrors.
DAEMON_SOCKET_DROPS = "tunproxy sockets drops"
_SS_USERS = re.compile(r"pid=(\d+),")
_SS_DROPS = re.compile(r"skmem:\(.*\bd(\d+)\)")


def socket_drops(ss_text: str, pids: set[int]) -> int:
    """Sum of sk_drops (skmem ``d``) over the sockets of ``ss -uanmp`` owned by any of ``pids``.

    ss prints each socket on one line (``users:(("python3",pid=7,fd=9))``) and its
    ``skmem:(...,d12)`` on the next; a socket of several processes counts once.
    """
    total, owned = 0, False
    for line in ss_text.splitlines():
        drops = _SS_DROPS.search(line)
        if drops:
            if owned:
                total += int(drops.group(1))
            owned = False
        else:
            owned = any(int(pid) in pids for pid in _SS_USERS.findall(line))
    return total


def kernel_counters(host: Host, pids: set[int] | None = None) -> dict[str, int]:
    """A namespace's drop counters: UDP socket errors (/proc/net/snmp), each link's dropped packets,
    and, with ``pids``, the drops of those processes' UDP sockets (``DAEMON_SOCKET_DROPS``)."""
    out = host.ns.run("sh", "-c", "cat /proc/net/snmp; echo ---; ip -j -s link; echo ---; ss -uanmp").stdout
    snmp, links, sockets = out.split("---\n", 2)
    counters: dict[str, int] = {}
    rows = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(rows) >= 2:
        for name, value in zip(rows[0][1:], rows[1][1:], strict=False):
            if name in ("RcvbufErrors", "SndbufErrors", "MemErrors"):  # InErrors counts these again
                counters[f"udp {name}"] = int(value)
    for link in json.loads(links):
        stats = link.get("stats64") or {}
        for direction in ("rx", "tx"):
            dropped = stats.get(direction, {}).get("dropped", 0)
            counters[f"{link['ifname']} {direction}_dropped"] = int(dropped)
    if pids:
        counters[DAEMON_SOCKET_DROPS] = socket_drops(sockets, pids)
    return counters


def kernel_drops_total(by_host: dict[str, dict[str, int]]) -> int:
    """Every kernel drop of a test, both hosts; the daemon's socket drops are in RcvbufErrors already."""
    return sum(n for d in by_host.values() for k, n in d.items() if k != DAEMON_SOCKET_DROPS)


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What grew between two snapshots (a counter that appeared counts from zero)."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


# --- the run --------------------------------------------------------------------------------------


class TestFailed(Exception):
    pass


class StartFailed(Exception):
    """A variant's daemons did not come up; ``info`` is what ``Bench.stop`` found (logs included)."""

    def __init__(self, message: str, info: dict[str, Any]) -> None:
        super().__init__(message)
        self.info = info


@dataclass
class Active:
    """A variant whose daemons are up: traffic goes from ``source`` on h1 to ``target`` on h2."""

    variant: Variant
    source: str
    target: str
    daemons: dict[str, Process]
    mtu: int | None
    scraper: Process | None = None


class Bench:
    def __init__(self, lab: Lab, config: Config, say: Callable[..., None]) -> None:
        self.lab = lab
        self.config = config
        self.say = say
        self.h1, self.h2 = lab.add_veth_pair(("h1", HOSTS["h1"][0]), ("h2", HOSTS["h2"][0]))
        self.h1.wait_ping(HOSTS["h2"][0])

    # daemons

    def start(self, variant: Variant) -> Active:
        if variant.backend is None:
            return Active(variant, HOSTS["h1"][0], HOSTS["h2"][0], {}, self.path_mtu(HOSTS["h2"][0]))
        daemons: dict[str, Process] = {}
        args = variant.args
        for host in (self.h1, self.h2):
            other = "h2" if host.name == "h1" else "h1"
            daemons[host.name] = host.tunproxy(
                "--network", NETWORK, "--subnet", HOSTS[host.name][1],
                "--peer", f"{HOSTS[other][0]}={HOSTS[other][1]}",
                "--backend", variant.backend, "--stats-interval", "0", *args,
            )  # fmt: skip
        active = Active(variant, overlay(HOSTS["h1"][1]), overlay(HOSTS["h2"][1]), daemons, None)
        try:
            for proc in daemons.values():
                proc.wait_for("our subnet is", timeout=20)
            self.h1.wait_ping(active.target, timeout=10)
            self.h2.wait_ping(overlay(HOSTS["h1"][1]), timeout=10)
        except (TimeoutError, RuntimeError) as e:
            info = self.stop(active, keep_logs=True)
            died = [d for d in info["daemons"] if d["returncode"] not in (0, None)]
            if died:
                last = (died[0]["log_tail"] or "").strip().splitlines() or ["no output"]
                why = f"tunproxy on {died[0]['host']} exited {died[0]['returncode']}: {last[-1]}"
            else:
                why = str(e).splitlines()[0]
            raise StartFailed(why, info) from None
        active.mtu = self.path_mtu(active.target)
        if variant.scrape:
            url = f"http://{HOSTS['h1'][0]}:9464/metrics"
            active.scraper = self.h1.start(sys.executable, "-c", SCRAPER.format(url=url), name="scraper")
        return active

    def stop(self, active: Active, keep_logs: bool = False) -> dict[str, Any]:
        """Stop the daemons; their exit codes and stats, and any state they left behind."""
        daemons = []
        scrapes = None
        if active.scraper is not None:
            active.scraper.stop(timeout=5)
            scrapes = active.scraper.output().count("scraped")
        for name, proc in active.daemons.items():
            code = proc.stop(timeout=10)
            lines = [line for line in proc.output().splitlines() if "stats:" in line]
            line = lines[-1].split("stats:", 1)[1].strip() if lines else None
            daemons.append(
                {
                    "host": name,
                    "pid": proc.pid,
                    "argv": proc.argv[2:],
                    "returncode": code,
                    "stats_line": line,
                    "stats": report.parse_stats(line) if line else None,
                    "log_tail": proc.output()[-2000:] if keep_logs or code != 0 else None,
                }
            )
        out = {"daemons": daemons, "leftovers": self.reset_hosts() if active.daemons else []}
        if scrapes is not None:
            out["metrics_scrapes"] = scrapes
        return out

    def reset_hosts(self) -> list[str]:
        """Remove overlay routes, devices and addresses a stopped daemon left; say what was found."""
        found = []
        for host in (self.h1, self.h2):
            routes = host.ns.ip("-4", "-o", "route", "show", "root", NETWORK).stdout.strip()
            if routes:
                found.append(f"{host.name} routes: {routes}")
                host.ns.ip("route", "flush", "root", NETWORK, check=False)
            for link in json.loads(host.ns.ip("-j", "link", "show").stdout):
                if link["ifname"] not in ("lo", "eth1"):
                    found.append(f"{host.name} link: {link['ifname']}")
                    host.ns.ip("link", "del", link["ifname"], check=False)
            for addr in host.ns.ip("-4", "-o", "addr", "show", "dev", "lo").stdout.split():
                if addr.startswith("10.100."):
                    found.append(f"{host.name} lo address: {addr}")
                    host.ns.ip("addr", "del", addr, "dev", "lo", check=False)
        return found

    def path_mtu(self, target: str) -> int | None:
        out = self.h1.ns.ip("route", "get", target, check=False).stdout
        found = re.search(r"\bmtu (\d+)", out) or None
        if found:
            return int(found.group(1))
        dev = re.search(r"\bdev (\S+)", out)
        if not dev:
            return None
        link = json.loads(self.h1.ns.ip("-j", "link", "show", "dev", dev.group(1)).stdout)
        return int(link[0]["mtu"])

    # tests

    @staticmethod
    def daemon_pids(active: Active, host: Host) -> set[int]:
        proc = active.daemons.get(host.name)
        return set() if proc is None else {proc.pid}

    def cpu(self, active: Active) -> dict[str, float | None]:
        return {name: cpu_seconds(proc.pid) for name, proc in active.daemons.items()}

    def measure(self, test: str, active: Active) -> dict[str, Any]:
        """One test, with the daemons' CPU time, their drop counters and the kernel's around it."""
        if test == "ping":
            server = None
        elif test == "rr":
            server = self.sockperf_server(active.target)
        else:
            server = self.iperf_server(active.target)
        try:
            pids = {h.name: self.daemon_pids(active, h) for h in (self.h1, self.h2)}
            counters = {h.name: kernel_counters(h, pids[h.name]) for h in (self.h1, self.h2)}
            drops_before = self.daemon_drops(active)  # outside the CPU window: answering costs CPU
            before, t0 = self.cpu(active), time.monotonic()
            if test == "ping":
                rec = self.ping(active.source, active.target)
            elif test == "rr":
                rec = self.rr(active.source, active.target)
            else:
                rec = self.iperf(test, active.source, active.target)
            rec["wall_s"] = round(time.monotonic() - t0, 3)
            after = self.cpu(active)
            drops_after = self.daemon_drops(active)
        finally:
            if server is not None:
                server.stop(timeout=3)
        rec["kernel_drops"] = {
            h.name: counter_deltas(counters[h.name], kernel_counters(h, pids[h.name]))
            for h in (self.h1, self.h2)
        }
        rec["kernel_drops_total"] = kernel_drops_total(rec["kernel_drops"])
        rec["daemon_drops"], rec["daemon_drops_total"] = drop_deltas(drops_before, drops_after)
        by_host: dict[str, float | None] = {}
        for name in active.daemons:
            b, a = before[name], after[name]
            by_host[name] = None if a is None or b is None else round(a - b, 3)
        rec["proxy_cpu_s_by_host"] = by_host
        values = list(by_host.values())
        rec["proxy_cpu_s"] = None if not values or None in values else round(sum(v or 0.0 for v in values), 3)
        rec["moved_bytes"] = report.moved_bytes(test, rec)
        rec["cpu_s_per_gb"] = report.cpu_seconds_per_gb(rec["proxy_cpu_s"], rec["moved_bytes"])
        return rec

    def daemon_drops(self, active: Active) -> dict[str, dict[str, int] | None]:
        """Each daemon's drop counters now, asked over its control socket (``tunproxy status``)."""
        from tunproxy.control import NoDaemon, default_socket, query

        out: dict[str, dict[str, int] | None] = {}
        for name in active.daemons:
            path = default_socket(self.lab.workdir / f"{name}-subnet.env")
            try:
                out[name] = daemon_drop_counters(query(path, "status"))
            except (NoDaemon, OSError) as e:  # the figures stay unknown; the test itself still counts
                self.say(f" (status of {name}: {e})", end="")
                out[name] = None
        return out

    def iperf_server(self, target: str) -> Process:
        """A one-shot iperf3 server on h2, listening when this returns."""
        # Bound to the target (the client too): a UDP server on a wildcard socket would answer
        # host-gw's overlay address (on lo) from its underlay address, and the client would hang.
        server = self.h2.start("iperf3", "-s", "-1", "-B", target, "-p", IPERF_PORT, name="iperf3")
        try:
            self._wait_listening(self.h2, IPERF_PORT, server)
        except BaseException:
            server.stop(timeout=3)
            raise
        return server

    def sockperf_server(self, target: str) -> Process:
        """A sockperf UDP server on h2 for one rr test, listening when this returns."""
        server = self.h2.start("sockperf", "server", "-i", target, "-p", SOCKPERF_PORT, name="sockperf")
        try:
            self._wait_listening(self.h2, SOCKPERF_PORT, server, udp=True)
        except BaseException:
            server.stop(timeout=3)
            raise
        return server

    def rr(self, source: str, target: str) -> dict[str, Any]:
        """sockperf ping-pong (UDP, one message in flight, as fast as replies come): round trips in us."""
        seconds = self.config.udp_seconds
        argv = ["sockperf", "ping-pong", "-i", target, "-p", SOCKPERF_PORT, "--client_ip", source]
        argv += ["-t", str(seconds), "-m", str(RR_MESSAGE), "--full-rtt"]
        try:
            done = self.h1.ns.run(*argv, check=False, timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            raise TestFailed(f"sockperf did not finish within {seconds + 20} s") from None
        try:
            rec = parse_sockperf(done.stdout)
        except ValueError as e:
            raise TestFailed(f"sockperf exited {done.returncode}: {e} {done.stderr.strip()[-200:]}") from None
        rec["message_bytes"] = RR_MESSAGE
        rec["seconds"] = seconds
        return rec

    def iperf(self, test: str, source: str, target: str) -> dict[str, Any]:
        seconds = self.config.seconds if test in ("tcp1", "tcp4") else self.config.udp_seconds
        extra = {
            "tcp1": (),
            "tcp4": ("-P", "4"),
            "udp": ("-u", "-b", "0", "-l", str(UDP_PAYLOAD)),
            "udpbulk": ("-u", "-b", "0", "-l", str(BULK_PAYLOAD)),
        }[test]
        argv = ["iperf3", "-c", target, "-B", source, "-p", IPERF_PORT, "-t", str(seconds), "-J"]
        argv += ["--connect-timeout", "3000"]
        try:
            done = self.h1.ns.run(*argv, *extra, check=False, timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            raise TestFailed(f"iperf3 did not finish within {seconds + 20} s") from None
        try:
            doc = json.loads(done.stdout)
        except json.JSONDecodeError:
            why = (done.stderr or done.stdout)[-300:]
            raise TestFailed(f"iperf3 exited {done.returncode}: {why}") from None
        if "error" in doc:
            raise TestFailed(f"iperf3: {doc['error']}")
        if test == "udp":
            rec = parse_iperf_udp(doc, UDP_PAYLOAD)
        elif test == "udpbulk":
            rec = parse_iperf_udp(doc, BULK_PAYLOAD)
        else:
            rec = parse_iperf_tcp(doc)
        rec["seconds"] = seconds
        return rec

    def ping(self, source: str, target: str) -> dict[str, Any]:
        count, interval = self.config.ping_count, self.config.ping_interval
        done = self.h1.ns.run(
            "ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", "-I", source, target,
            check=False, timeout=count * interval + 15,
        )  # fmt: skip
        rec = parse_ping(done.stdout)
        if not rec["rtt_ms"]:
            raise TestFailed(f"no ping reply: {(done.stdout + done.stderr)[-300:]}")
        return rec

    @staticmethod
    def _wait_listening(
        host: Host, port: str, server: Process, timeout: float = 5, udp: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.ns.run("ss", "-Hlun" if udp else "-Hltn", f"sport = :{port}").stdout.strip():
                return
            if not server.alive():
                break
            time.sleep(0.05)
        raise TestFailed(f"{server.argv[0]} server did not listen: {server.output()[-300:]}")

    # the whole run

    def run(self) -> dict[str, Any]:
        cfg = self.config
        steps = schedule(cfg.variants, cfg.rounds, cfg.tests)
        width = len(str(len(steps)))
        runs: list[dict[str, Any]] = []
        errors: list[str] = []
        current: dict[str, Any] | None = None
        active: Active | None = None
        start_error: str | None = None
        t0 = time.monotonic()

        def finish() -> None:
            if current is not None and active is not None:
                current.update(self.stop(active))
                where = f"round {current['round']} {current['variant']}"
                for d in current["daemons"]:
                    if d["returncode"] != 0:
                        errors.append(f"{where}: tunproxy on {d['host']} exited {d['returncode']}")

        for step in steps:
            if current is None or (current["round"], current["variant"]) != (step.round, step.variant):
                finish()
                active, start_error = None, None
                variant = BY_NAME[step.variant]
                current = {"round": step.round, "variant": variant.name, "label": variant.label,
                           "kernel_datapath": variant.kernel, "started": now_iso(), "tests": {}}  # fmt: skip
                runs.append(current)
                try:
                    active = self.start(variant)
                    current.update(target=active.target, mtu=active.mtu)
                except (StartFailed, RuntimeError, subprocess.SubprocessError) as e:
                    if isinstance(e, StartFailed):
                        current.update(e.info)
                    start_error = f"could not start: {e}"
                    current["error"] = start_error
                    errors.append(f"round {step.round} {step.variant}: {start_error}")
            prefix = f"[{step.index:{width}}/{len(steps)}] round {step.round} {step.variant} {step.test} ..."
            if active is None:
                self.say(f"{prefix} skipped ({(start_error or '').splitlines()[0][:100]})")
                current["tests"][step.test] = {"error": start_error}
                continue
            self.say(prefix, end="")
            try:
                rec = self.measure(step.test, active)
                self.say(" " + describe(step, rec))
            except (TestFailed, RuntimeError, subprocess.SubprocessError) as e:
                rec = {"error": str(e)}
                errors.append(f"round {step.round} {step.variant} {step.test}: {e}")
                self.say(f" FAILED: {e}")
            current["tests"][step.test] = rec
            time.sleep(0.2)  # let queues drain between tests
        finish()
        return {"runs": runs, "errors": errors, "elapsed_s": round(time.monotonic() - t0, 1)}


def overlay(subnet: str) -> str:
    """Each host's overlay address: its subnet's first address (what every backend puts on a device)."""
    return subnet.split("/")[0]


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def describe(step: Step, rec: dict[str, Any]) -> str:
    """The figures of one step for the progress line."""
    cpu = rec.get("proxy_cpu_s")
    if step.test == "ping":
        return f"{rec['median_ms']:.3f} ms median, {rec['received']}/{rec['transmitted']} replies"
    if step.test == "rr":
        text = (
            f"rtt mean {rec['mean_us']:.1f} us, p50 {report.fmt_number(rec['p50_us'])}, "
            f"p99 {report.fmt_number(rec['p99_us'])}, p99.9 {report.fmt_number(rec['p999_us'])}"
        )
    elif step.test == "udp":
        text = f"{rec['delivered_pps'] / 1e3:.0f} kpps delivered, {rec['lost_percent']:.1f}% lost"
    elif step.test == "udpbulk":
        text = (
            f"{rec['delivered_bps'] / 1e9:.2f} Gbit/s, {rec['delivered_pps'] / 1e3:.0f} kpps delivered, "
            f"{rec['lost_percent']:.1f}% lost"
        )
    else:
        text = f"{rec['received_bps'] / 1e9:.2f} Gbit/s, {rec['retransmits']} retr"
    if cpu is not None:
        text += f", proxy CPU {cpu:.2f} s"
        if rec.get("cpu_s_per_gb") is not None and step.test != "rr":
            text += f" ({report.fmt_number(rec['cpu_s_per_gb'])} s/GB)"
    if rec.get("daemon_drops_total"):
        text += f"; tunproxy drops {report.fmt_number(rec['daemon_drops_total'], count=True)}"
    drops = sorted(
        ((n, f"{host} {k}") for host, d in (rec.get("kernel_drops") or {}).items() for k, n in d.items()),
        reverse=True,
    )
    if drops:
        text += "; drops " + ", ".join(f"{what} {report.fmt_number(n, count=True)}" for n, what in drops[:2])
    return text


def run_bench(config: Config, say: Callable[..., None]) -> dict[str, Any]:
    """Build the lab, run every step, tear everything down; the result without summary."""
    cleanup_dead_labs(PREFIX)
    machine = machine_info()
    if float(machine["loadavg_start"][0]) > 0.5:
        say(f"note: load average {machine['loadavg_start'][0]} at start; other work skews the figures")
    lab = Lab(prefix=f"{PREFIX}{os.getpid()}")
    try:
        result = Bench(lab, config, say).run()
    finally:
        with ignoring_signals():
            lab.close()
    with open("/proc/loadavg") as f:
        machine["loadavg_end"] = f.read().split()[:3]
    return {"schema": 1, "machine": machine, "config": config.as_dict(), **result}


@contextlib.contextmanager
def ignoring_signals():  # type: ignore[no-untyped-def]
    """A second Ctrl-C must not cut the cleanup short."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
