"""``python -m bench.profile``: where one TCP stream's CPU goes, and the floor that sets.

The bench's two namespaces, one variant at a time (tunproxy udp and kernel
VXLAN by default), one iperf3 TCP stream of ``--seconds``, run under ``perf
record -a -e cpu-clock``: every CPU is sampled at 999 Hz for exactly as long as
the iperf3 client runs, idle included. Each sample is put in one bucket by
thread and symbol: the tunproxy daemons' kernel copies to and from user
memory, their checksums (the fused copy-and-sum included), the rest of the C
fast path, Python and its libraries, the scheduler and wake-ups, the rest of
their kernel time; then iperf3's threads, idle, anything else. A bucket's
share of the samples, times the CPUs and the window, over the bytes the
iperf3 server received, is its CPU seconds per GB: the unit of issue 14's
target (0.45 s/GB for both daemons).

What a thread's kernel time holds is the kernel's choice: a TUN write
delivers the inner packet to TCP in the writer's context, so some of the
receiving iperf3's TCP work is billed to the daemon, and with kernel VXLAN
everything (TCP, VXLAN, veth, the peer's receive) is billed to the two
iperf3 processes and idle.

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
import time
from collections.abc import Callable, Iterable
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
# With cpu-clock sampling the irq-restoring unlock also collects whatever ran with irqs off
# before it, so this bucket is an upper bound.
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
    ("wakeups", "tunproxy: scheduler and wake-ups (at most)"),
    ("kernel", "tunproxy: the rest of its kernel time (network stack, syscalls)"),
    ("iperf3", "iperf3, both ends (their threads' kernel time included)"),
    ("idle", "idle"),
    ("other", "anything else"),
)
DAEMON_BUCKETS = ("copies", "checksums", "fastpath", "python", "wakeups", "kernel")

# One line of `perf report -n --sort pid,dso,sym --stdio -g none` (the percent is rounded,
# so the sample count is what is added up; a name may hold spaces, e.g. "memfd:x (deleted)"):
#     6.06%        604    31513:python3   [kernel.kallsyms]   [k] _copy_from_iter
REPORT_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\d+):(.+?)\s{2,}(.+?)\s+\[([k.])\]\s+(.+?)\s*$")


@dataclass(frozen=True)
class Sample:
    """One row of perf's report: ``count`` samples in thread ``tid`` (``comm``), in ``dso``
    at ``symbol``; ``kernel`` for kernel space."""

    count: int
    tid: int
    comm: str
    dso: str
    kernel: bool
    symbol: str


def parse_report(text: str) -> list[Sample]:
    """The rows of ``perf report -n --sort pid,dso,sym --stdio -g none``; comment lines,
    blanks and anything else that is not a row are skipped."""
    rows = []
    for line in text.splitlines():
        found = REPORT_LINE.match(line)
        if found:
            count, tid, comm, dso, space, symbol = found.groups()
            rows.append(Sample(int(count), int(tid), comm.strip(), dso, space == "k", symbol))
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
    """Percent (0-100) of all samples per bucket, every bucket present; they add up to 100
    (all 0.0 if there are no samples)."""
    counts = dict.fromkeys((name for name, _ in BUCKETS), 0)
    for sample in samples:
        counts[bucket(sample, daemon_tids)] += sample.count
    total = sum(counts.values())
    return {name: (100 * n / total if total else 0.0) for name, n in counts.items()}


def seconds_per_gb(
    shares: dict[str, float], cpus: int, window_s: float, gigabytes: float
) -> dict[str, float]:
    """CPU seconds per GB moved, per bucket: share x CPUs x window / GB (0 GB gives inf)."""
    cpu_s = cpus * window_s
    return {k: (v / 100 * cpu_s / gigabytes if gigabytes else float("inf")) for k, v in shares.items()}


def received_gb(iperf_json: dict[str, Any]) -> tuple[float, float]:
    """(GB received by the iperf3 server, over how many seconds), from the client's ``-J`` output
    (``end.sum_received``). Raises ValueError if it has none (iperf3 failed)."""
    try:
        total = iperf_json["end"]["sum_received"]
        return total["bytes"] / 1e9, float(total["seconds"])
    except (KeyError, TypeError):
        raise ValueError(f"iperf3: {iperf_json.get('error', 'no end.sum_received in its output')}") from None


def render(result: dict[str, Any]) -> str:
    """The table a person reads, from one ``profile()`` result: bucket, % of all CPUs' samples,
    CPU s/GB; then the daemons' total."""
    shares, per_gb = result["shares"], result["seconds_per_gb"]
    lines = [
        f"{result['variant']}: {result['gbit_s']:.2f} Gbit/s, {result['gigabytes']:.2f} GB received; "
        f"{result['cpus']} CPUs sampled for {result['window_s']:.1f} s ({result['samples']} samples)",
        f"{'':66} {'% of CPUs':>9} {'s/GB':>7}",
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


def profile(variant_name: str, seconds: int, say: Callable[..., None]) -> dict[str, Any]:
    """Profile one TCP stream of ``seconds`` (> 0) through a bench variant (a name in
    bench.plan.BY_NAME) in a lab of its own, torn down before this returns.

    Returns {variant, when (UTC, ISO 8601), cpus, window_s (seconds sampled), gigabytes (received,
    10^9 bytes), gbit_s (iperf3's own rate), samples (count), shares (bucket: percent),
    seconds_per_gb (bucket: CPU s/GB)}. Raises bench.harness.StartFailed if the variant's
    daemons do not come up, RuntimeError if perf fails (its last line), ValueError if iperf3 does.
    """
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
        data = lab.workdir / "perf.data"
        try:
            server = bench.iperf_server(active.target)
            tids = daemon_threads(p.pid for p in active.daemons.values())
            client = bench.h1.ns.cmd(
                "iperf3", "-c", active.target, "-B", active.source, "-p", IPERF_PORT,
                "-t", str(seconds), "-J", "--connect-timeout", "3000",
            )  # fmt: skip
            # perf samples every CPU for exactly as long as the client runs.
            record = ["perf", "record", "-a", "-e", "cpu-clock", "-F", "999", "-o", str(data), "--", *client]
            began = time.monotonic()
            done = subprocess.run(record, capture_output=True, text=True, timeout=seconds + 60)
            window_s = time.monotonic() - began
            server.stop()
        finally:
            bench.stop(active)
        if not data.exists() or (done.returncode != 0 and not done.stdout.strip()):
            raise RuntimeError(f"perf record: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        gigabytes, iperf_s = received_gb(_json(done.stdout))
        report_argv = ["perf", "report", "-i", str(data), "-n", "--no-children", "--sort", "pid,dso,sym"]
        report_argv += ["--stdio", "-g", "none"]
        reported = subprocess.run(report_argv, capture_output=True, text=True, timeout=300)
        if reported.returncode != 0:
            raise RuntimeError(f"perf report: {(reported.stderr.strip().splitlines() or ['failed'])[-1]}")
    finally:
        lab.close()
    rows = parse_report(reported.stdout)
    shares = breakdown(rows, tids)
    cpus = os.cpu_count() or 1
    return {
        "variant": variant_name,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": cpus,
        "window_s": window_s,
        "gigabytes": gigabytes,
        "gbit_s": gigabytes * 8 / iperf_s if iperf_s else 0.0,
        "samples": sum(row.count for row in rows),
        "shares": shares,
        "seconds_per_gb": seconds_per_gb(shares, cpus, window_s, gigabytes),
    }


def _json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise ValueError(f"iperf3 printed no JSON: {text.strip()[-200:] or 'nothing'}") from None
    if not isinstance(doc, dict):
        raise ValueError("iperf3 printed JSON that is not an object")
    return doc


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{value} is out of range (1-600 seconds)")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.profile``: profile each variant, print its table, write the JSON
    (after each variant, so a later failure keeps what was measured); 0 on success, 1 if a
    variant failed (one line), 2 on a usage error."""
    from .harness import StartFailed
    from .plan import BY_NAME

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument(
        "--variants", default="udp,vxlan", help="comma-separated bench variants (default udp,vxlan)"
    )
    p.add_argument("--seconds", type=_seconds, default=6, help="one stream's length, 1-600 (default 6)")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"where the JSON goes (default {RESULTS_DIR})"
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        p.error(
            f"unknown variant {', '.join(unknown) or repr(args.variants)}; choose from {', '.join(BY_NAME)}"
        )
    if os.geteuid() != 0:
        p.error("needs root: it builds network namespaces and runs perf on every CPU")
    if shutil.which("perf") is None:
        p.error("perf is not installed (Debian: apt-get install linux-perf)")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"profile-{stamp}.json"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text("[]\n")
    except OSError as e:
        p.error(f"--out {args.out}: {e.strerror or e}")
    results: list[dict[str, Any]] = []
    for name in names:
        print(f"profiling {name}: one TCP stream of {args.seconds} s ...", flush=True)
        try:
            result = profile(name, args.seconds, lambda *a, **k: print(*a, **k, flush=True))
        except (StartFailed, RuntimeError, ValueError, OSError, subprocess.SubprocessError) as e:
            print(f"bench.profile: {name}: {(str(e).splitlines() or [type(e).__name__])[0]}", flush=True)
            return _done(path, results, 1)
        except KeyboardInterrupt:
            print(f"bench.profile: interrupted during {name}; the lab is torn down", flush=True)
            return _done(path, results, 130)
        print(render(result), flush=True)
        if BY_NAME[name].backend is None or BY_NAME[name].kernel:
            print(f"({name}: no tunproxy data path; the kernel's work is in the iperf3 and idle rows)")
        results.append(result)
        path.write_text(json.dumps(results, indent=1))
    return _done(path, results, 0)


def _done(path: Path, results: list[dict[str, Any]], code: int) -> int:
    """Say where the results are, or remove the file if nothing was measured."""
    if results:
        print(f"results: {path}")
    else:
        path.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
