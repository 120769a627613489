"""``python -m bench.profile``: where one TCP stream's CPU goes, and the floor that sets.

The bench's two namespaces, one variant (tunproxy udp by default), one iperf3
TCP stream; ``perf record -a`` samples every CPU for ``--seconds`` in the middle
of it. Each sample is put in one bucket: the tunproxy daemons' kernel copies
to and from user memory, their checksums (the fused copy-and-sum included),
the rest of the C fast path, Python and its libraries, sleeping and waking,
the rest of their kernel time (the network stack, system calls), then iperf3, idle,
and anything else. A bucket's share of all samples, times the CPUs and the
window, over the gigabytes iperf3 received in that window, is its CPU seconds
per GB: the unit of issue 14's target (0.45 s/GB for both daemons).

The copies are the floor of this design: every byte crosses the user/kernel
boundary four times in the daemons (TUN read, UDP send, UDP receive, TUN
write) and once more in user memory (the TSO split), where kernel VXLAN hands
one skb along with none. ``make bench-profile`` runs it; the JSON goes to
bench/results/profile-<timestamp>.json. Needs perf (Debian: linux-perf).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# The kernel's copies to and from user memory (lib/iov_iter.c, arch/x86/lib) and the
# hardened-usercopy checks every one of them runs (mm/usercopy.c).
KERNEL_COPY_SYMBOLS = frozenset(
    {
        "_copy_to_iter",
        "_copy_from_iter",
        "_copy_from_iter_nocache",
        "copy_user_generic",
        "rep_movs_alternative",
        "copy_user_enhanced_fast_string",
        "__check_object_size",
        "__virt_addr_valid",
        "check_heap_object",
        "check_stack_object",
        "_copy_from_user",
        "_copy_to_user",
    }
)
# Going to sleep and waking up (kernel/sched, fs/eventpoll.c): a wake-up's cost lands in
# the waker (try_to_wake_up, the irq-restoring unlock) and in the sleeper (the switch back).
WAKEUP_SYMBOL = re.compile(
    r"^(finish_task_switch|__schedule|schedule|try_to_wake_up|_raw_spin_unlock_irqrestore|"
    r"ep_poll|ep_poll_callback|__wake_up|select_task_rq|enqueue_task|dequeue_task|pick_next_task|"
    r"update_curr|psi_task_change|ttwu_|__switch_to)"
)
FASTPATH_DSO = re.compile(r"_fastpath")
CHECKSUM_SYMBOL = re.compile(r"sum|csum")

BUCKETS = (
    ("copies", "tunproxy: kernel copies to/from user memory"),
    ("checksums", "tunproxy: checksums (copy-and-sum included)"),
    ("fastpath", "tunproxy: the rest of the C fast path"),
    ("python", "tunproxy: Python, uvloop, libc"),
    ("wakeups", "tunproxy: sleeping and waking (scheduler, epoll)"),
    ("kernel", "tunproxy: the rest of its kernel time (network stack, syscalls)"),
    ("iperf3", "iperf3 (sender and receiver, their kernel time included)"),
    ("idle", "idle"),
    ("other", "anything else"),
)
DAEMON_BUCKETS = ("copies", "checksums", "fastpath", "python", "wakeups", "kernel")

# One line of `perf report --sort pid,dso,sym --stdio -g none`:
#     6.06%    31513:python3   [kernel.kallsyms]   [k] _copy_from_iter
REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+):(\S+)\s+(\S+)\s+\[([k.])\]\s+(\S+)")


@dataclass(frozen=True)
class Sample:
    """One row of perf's report: ``percent`` of all samples, in thread ``tid``."""

    percent: float
    tid: int
    comm: str
    dso: str
    kernel: bool
    symbol: str


def parse_report(text: str) -> list[Sample]:
    """The rows of ``perf report --sort pid,dso,sym --stdio -g none``; headers and blanks skipped."""
    rows = []
    for line in text.splitlines():
        found = REPORT_LINE.match(line)
        if found:
            pct, tid, comm, dso, space, symbol = found.groups()
            rows.append(Sample(float(pct), int(tid), comm, dso, space == "k", symbol))
    return rows


def bucket(sample: Sample, daemon_tids: frozenset[int]) -> str:
    """The name of the BUCKETS entry one row belongs to (threads in ``daemon_tids`` are tunproxy)."""
    if sample.tid in daemon_tids:
        if sample.kernel:
            if sample.symbol in KERNEL_COPY_SYMBOLS:
                return "copies"
            return "wakeups" if WAKEUP_SYMBOL.match(sample.symbol) else "kernel"
        if FASTPATH_DSO.search(sample.dso):
            return "checksums" if CHECKSUM_SYMBOL.search(sample.symbol) else "fastpath"
        return "python"
    if sample.comm == "iperf3":
        return "iperf3"
    if sample.tid == 0:
        return "idle"
    return "other"


def breakdown(samples: Iterable[Sample], daemon_tids: frozenset[int]) -> dict[str, float]:
    """Percent of all samples per bucket, every bucket present (0.0 if empty)."""
    out = dict.fromkeys((name for name, _ in BUCKETS), 0.0)
    for sample in samples:
        out[bucket(sample, daemon_tids)] += sample.percent
    return out


def seconds_per_gb(
    shares: dict[str, float], cpus: int, window_s: float, gigabytes: float
) -> dict[str, float]:
    """CPU seconds per GB moved, per bucket: share x CPUs x window / GB (0 GB gives inf)."""
    cpu_s = cpus * window_s
    return {k: (v / 100 * cpu_s / gigabytes if gigabytes else float("inf")) for k, v in shares.items()}


def received_gb(iperf_json: dict[str, Any], start_s: float, end_s: float) -> float:
    """GB (10^9 bytes) the iperf3 receiver got in the intervals that lie within [start_s, end_s]."""
    total = 0
    for interval in iperf_json.get("intervals", []):
        s = interval["sum"]
        if s["start"] >= start_s - 0.05 and s["end"] <= end_s + 0.05:
            total += s["bytes"]
    return total / 1e9


def render(result: dict[str, Any]) -> str:
    """The table a person reads: bucket, % of all samples, CPU s/GB."""
    shares, per_gb = result["shares"], result["seconds_per_gb"]
    lines = [
        f"{result['variant']}: {result['gbit_s']:.2f} Gbit/s over {result['window_s']:.0f} s "
        f"({result['gigabytes']:.2f} GB), {result['cpus']} CPUs, {result['samples']} samples",
        f"{'':66} {'% of CPU':>9} {'s/GB':>7}",
    ]
    for name, label in BUCKETS:
        lines.append(f"{label:66} {shares[name]:9.1f} {per_gb[name]:7.3f}")
    daemons = sum(shares[n] for n in DAEMON_BUCKETS)
    lines.append(f"{'tunproxy daemons, all':66} {daemons:9.1f} {sum(per_gb[n] for n in DAEMON_BUCKETS):7.3f}")
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------


def daemon_threads(pids: Iterable[int]) -> frozenset[int]:
    """Every thread id of these processes (workers run the C on threads of their own)."""
    tids = set()
    for pid in pids:
        try:
            tids.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        except FileNotFoundError:
            pass
    return frozenset(tids)


def profile(variant_name: str, seconds: int, say: Any) -> dict[str, Any]:
    """Start the variant in the bench's lab, stream for seconds + 3, sample seconds of it."""
    from lab.netns import Lab, cleanup_dead_labs

    from .harness import IPERF_PORT, PREFIX, Bench, Config
    from .plan import BY_NAME

    cleanup_dead_labs(PREFIX)
    lab = Lab(prefix=f"{PREFIX}{os.getpid()}")
    try:
        config = Config(
            variants=(variant_name,), rounds=1, seconds=seconds, udp_seconds=seconds, ping_count=1
        )
        bench = Bench(lab, config, say)
        active = bench.start(BY_NAME[variant_name])
        try:
            server = bench.iperf_server(active.target)
            tids = daemon_threads(p.pid for p in active.daemons.values())
            data = lab.workdir / "perf.data"
            argv = ["iperf3", "-c", active.target, "-B", active.source, "-p", IPERF_PORT]
            argv += ["-t", str(seconds + 3), "-J", "--connect-timeout", "3000"]
            box: dict[str, Any] = {}
            client = threading.Thread(
                target=lambda: box.update(done=bench.h1.ns.run(*argv, check=False, timeout=seconds + 30))
            )
            client.start()
            time.sleep(1.0)
            perf = ["perf", "record", "-a", "-F", "999", "-o", str(data), "--", "sleep", str(seconds)]
            subprocess.run(perf, capture_output=True, check=True, timeout=seconds + 30)
            client.join()
            server.stop()
        finally:
            bench.stop(active)
        report_argv = ["perf", "report", "-i", str(data), "--no-children", "--sort", "pid,dso,sym"]
        report_argv += ["--stdio", "-g", "none"]
        report = subprocess.run(report_argv, capture_output=True, text=True, check=True, timeout=300).stdout
        samples_line = re.search(r"# Samples: (\S+)", report)
    finally:
        lab.close()
    doc = json.loads(box["done"].stdout)
    if "error" in doc:
        raise RuntimeError(f"iperf3: {doc['error']}")
    gigabytes = received_gb(doc, 1.0, 1.0 + seconds)
    shares = breakdown(parse_report(report), tids)
    cpus = os.cpu_count() or 1
    return {
        "variant": variant_name,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": cpus,
        "window_s": float(seconds),
        "gigabytes": gigabytes,
        "gbit_s": gigabytes * 8 / seconds,
        "samples": samples_line.group(1) if samples_line else "?",
        "shares": shares,
        "seconds_per_gb": seconds_per_gb(shares, cpus, seconds, gigabytes),
    }


def main(argv: list[str] | None = None) -> int:
    from .harness import StartFailed
    from .plan import BY_NAME

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants", default="udp,vxlan", help="comma-separated bench variants (default udp,vxlan)"
    )
    p.add_argument("--seconds", type=int, default=6, help="seconds sampled per variant (default 6)")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"where the JSON goes (default {RESULTS_DIR})"
    )
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown variant {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    if os.geteuid() != 0:
        p.error("needs root: it builds network namespaces and runs perf on every CPU")
    if shutil.which("perf") is None:
        p.error("perf is not installed (Debian: apt-get install linux-perf)")
    results = []
    for name in names:
        print(f"profiling {name} for {args.seconds} s ...", flush=True)
        try:
            result = profile(name, args.seconds, lambda *a, **k: print(*a, **k, flush=True))
        except (StartFailed, RuntimeError, OSError, subprocess.SubprocessError, KeyError) as e:
            print(f"bench.profile: {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return 1
        print(render(result), flush=True)
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
