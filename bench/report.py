"""The numbers of a bench run turned into figures and tables (pure: dicts in, strings out).

A run's raw record is a list of ``runs``, one per variant per round, each
holding the raw figures of its tests (see ``harness``). Everything here is
derived from those records, so a saved results JSON can be re-rendered with
``python -m bench --report FILE``.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunproxy.counters import DROP_REASONS

from .plan import BASELINES, BY_NAME, TARGETS, Target

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Stat:
    """The median of a few repetitions and their spread."""

    median: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "n": self.n}


def summarize(values: Iterable[float | None]) -> Stat | None:
    """Median, min and max of the values that exist; None when none does."""
    got = [float(v) for v in values if v is not None]
    if not got:
        return None
    return Stat(statistics.median(got), min(got), max(got), len(got))


def ratio(value: Stat | None, baseline: Stat | None) -> float | None:
    """value / baseline, medians; None if either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline.median == 0:
        return None
    return value.median / baseline.median


def cpu_seconds_per_gb(cpu_s: float | None, nbytes: float | None) -> float | None:
    """CPU seconds spent per gigabyte (1e9 bytes) moved; None if unknown or nothing moved."""
    if cpu_s is None or not nbytes:
        return None
    return cpu_s / (nbytes / 1e9)


PING_BYTES = 64  # ICMP echo: 8 header + ping's default 56 data bytes


def moved_bytes(test: str, rec: Record) -> float | None:
    """Payload bytes a test moved through the overlay (what CPU s/GB divides by); None if unknown.

    TCP: bytes received. UDP: datagrams delivered x payload. rr: messages sent
    and received over the whole run x message size. ping: echo requests and
    replies x 64 ICMP bytes. Records saved before a field existed fall back
    to what they hold.
    """
    if test in ("tcp1", "tcp4"):
        return rec.get("received_bytes")
    if test in ("udp", "udpbulk"):
        if rec.get("delivered_bytes") is not None:
            return rec["delivered_bytes"]
        packets, payload = rec.get("delivered_packets"), rec.get("payload_bytes")
        return None if packets is None or payload is None else packets * payload
    if test == "rr":
        sent, received = rec.get("total_sent_messages"), rec.get("total_received_messages")
        size = rec.get("message_bytes")
        return None if sent is None or received is None or size is None else (sent + received) * size
    if test == "ping":
        sent, received = rec.get("transmitted"), rec.get("received")
        return None if sent is None or received is None else (sent + received) * PING_BYTES
    return None


def _get(test: str, key: str, scale: float = 1.0) -> Callable[[Record], float | None]:
    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        value = rec.get(key)
        return None if value is None else value * scale

    return extract


def _cpu_per_gb(test: str) -> Callable[[Record], float | None]:
    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        if rec.get("cpu_s_per_gb") is not None:
            return float(rec["cpu_s_per_gb"])
        return cpu_seconds_per_gb(rec.get("proxy_cpu_s"), moved_bytes(test, rec))

    return extract


def _kernel_drops(test: str) -> Callable[[Record], float | None]:
    """The kernel's drop counters that grew during a test, summed over both hosts."""

    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        if rec.get("kernel_drops_total") is not None:
            return float(rec["kernel_drops_total"])
        if "kernel_drops" not in rec:
            return None
        return float(sum(n for d in rec["kernel_drops"].values() for n in d.values()))  # saved before

    return extract


def _cpu_pct(test: str) -> Callable[[Record], float | None]:
    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        cpu, wall = rec.get("proxy_cpu_s"), rec.get("wall_s")
        return None if cpu is None or not wall else 100.0 * cpu / wall

    return extract


def _cpu_us_per_packet(tests: Record) -> float | None:
    rec = tests.get("udp") or {}
    cpu, packets = rec.get("proxy_cpu_s"), rec.get("delivered_packets")
    return None if cpu is None or not packets else 1e6 * cpu / packets


@dataclass(frozen=True)
class Metric:
    key: str
    header: str
    extract: Callable[[Record], float | None]
    count: bool = False  # an event count: shown as 53k, not 53012.0


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("tcp1_gbps", "TCP x1 Gbit/s", _get("tcp1", "received_bps", 1e-9)),
        Metric("tcp4_gbps", "TCP x4 Gbit/s", _get("tcp4", "received_bps", 1e-9)),
        Metric("udp_kpps", "UDP-64 kpps", _get("udp", "delivered_pps", 1e-3)),
        Metric("udp_loss_pct", "UDP-64 loss %", _get("udp", "lost_percent")),
        Metric("udpbulk_gbps", "UDP-1400 Gbit/s", _get("udpbulk", "delivered_bps", 1e-9)),
        Metric("udpbulk_kpps", "UDP-1400 kpps", _get("udpbulk", "delivered_pps", 1e-3)),
        Metric("udpbulk_loss_pct", "UDP-1400 loss %", _get("udpbulk", "lost_percent")),
        Metric("ping_ms", "ping ms", _get("ping", "median_ms")),
        Metric("rr_mean_us", "rr mean us", _get("rr", "mean_us")),
        Metric("rr_p50_us", "rr p50 us", _get("rr", "p50_us")),
        Metric("rr_p99_us", "rr p99 us", _get("rr", "p99_us")),
        Metric("rr_p999_us", "rr p99.9 us", _get("rr", "p999_us")),
        Metric("tcp1_retransmits", "TCP x1 retr", _get("tcp1", "retransmits"), count=True),
        Metric("tcp4_retransmits", "TCP x4 retr", _get("tcp4", "retransmits"), count=True),
        Metric("udp_daemon_drops", "UDP-64 tunproxy drops", _get("udp", "daemon_drops_total"), count=True),
        Metric("udp_kernel_drops", "UDP-64 kernel drops", _kernel_drops("udp"), count=True),
        Metric(
            "udpbulk_daemon_drops",
            "UDP-1400 tunproxy drops",
            _get("udpbulk", "daemon_drops_total"),
            count=True,
        ),
        Metric("udpbulk_kernel_drops", "UDP-1400 kernel drops", _kernel_drops("udpbulk"), count=True),
        Metric("tcp1_cpu_s_per_gb", "CPU s/GB TCP x1", _cpu_per_gb("tcp1")),
        Metric("tcp4_cpu_s_per_gb", "CPU s/GB TCP x4", _cpu_per_gb("tcp4")),
        Metric("udp_cpu_s_per_gb", "CPU s/GB UDP-64", _cpu_per_gb("udp")),
        Metric("udpbulk_cpu_s_per_gb", "CPU s/GB UDP-1400", _cpu_per_gb("udpbulk")),
        Metric("rr_cpu_s_per_gb", "CPU s/GB rr", _cpu_per_gb("rr")),
        Metric("ping_cpu_s_per_gb", "CPU s/GB ping", _cpu_per_gb("ping")),
        Metric("tcp1_cpu_pct", "CPU % (TCP x1)", _cpu_pct("tcp1")),
        Metric("udp_cpu_us_per_pkt", "CPU us/pkt (UDP-64)", _cpu_us_per_packet),
    )
}
# Tables of figures (what a variant delivers, how fast it answers, what it costs, what it loses),
# then one of ratios per baseline.
FIGURE_COLUMNS = (
    "tcp1_gbps",
    "tcp4_gbps",
    "udp_kpps",
    "udp_loss_pct",
    "udpbulk_gbps",
    "udpbulk_kpps",
    "udpbulk_loss_pct",
)
LATENCY_COLUMNS = ("ping_ms", "rr_mean_us", "rr_p50_us", "rr_p99_us", "rr_p999_us")
COST_COLUMNS = (
    "tcp1_cpu_s_per_gb",
    "tcp4_cpu_s_per_gb",
    "udp_cpu_s_per_gb",
    "udpbulk_cpu_s_per_gb",
    "rr_cpu_s_per_gb",
    "ping_cpu_s_per_gb",
    "tcp1_cpu_pct",
    "udp_cpu_us_per_pkt",
)
DROP_COLUMNS = (
    "tcp1_retransmits",
    "tcp4_retransmits",
    "udp_daemon_drops",
    "udp_kernel_drops",
    "udpbulk_daemon_drops",
    "udpbulk_kernel_drops",
)
# Figures of the daemons themselves: nothing to show where no daemon runs (raw), and no drop
# counters where the kernel moves the packets (vxlan, host-gw).
CPU_COLUMNS = set(COST_COLUMNS)
DAEMON_DROP_COLUMNS = {"udp_daemon_drops", "udpbulk_daemon_drops"}
RATIO_COLUMNS = {
    "tcp1_gbps": "TCP x1",
    "tcp4_gbps": "TCP x4",
    "udp_kpps": "UDP-64 pps",
    "udpbulk_gbps": "UDP-1400",
    "rr_mean_us": "rr mean",
    "rr_p999_us": "rr p99.9",
    "ping_ms": "ping",
}
BASELINE_SHORT = {"vxlan": "vxlan", "udp-batch1": "batch1"}
MISSING = "-"  # a figure the run does not hold (a test not run, or saved before it existed)


def variants_of(runs: Sequence[Record]) -> list[str]:
    """The variants in the runs, in the order the bench defines them (unknown ones last)."""
    seen = list(dict.fromkeys(r["variant"] for r in runs))
    order = list(BY_NAME)
    return sorted(seen, key=lambda v: order.index(v) if v in order else len(order))


def summary(runs: Sequence[Record]) -> dict[str, dict[str, Stat | None]]:
    """variant -> metric -> Stat over the rounds."""
    out: dict[str, dict[str, Stat | None]] = {}
    for variant in variants_of(runs):
        mine = [r.get("tests") or {} for r in runs if r["variant"] == variant]
        out[variant] = {key: summarize(m.extract(t) for t in mine) for key, m in METRICS.items()}
    return out


def ratios(
    table: Mapping[str, Mapping[str, Stat | None]], baselines: Sequence[str] = BASELINES
) -> dict[str, dict[str, dict[str, float | None]]]:
    """variant -> baseline -> metric -> ratio of medians (baselines missing from the run are left out)."""
    return {
        variant: {
            base: {key: ratio(row.get(key), table[base].get(key)) for key in RATIO_COLUMNS}
            for base in baselines
            if base in table
        }
        for variant, row in table.items()
    }


def applies(target: Target, variant: str) -> bool:
    """Issue 14's targets are for tunproxy's own (userspace) data path, not for the kernel's."""
    known = BY_NAME.get(variant)
    return known is not None and not known.kernel and known.backend is not None


def target_results(
    table: Mapping[str, Mapping[str, Stat | None]], targets: Sequence[Target] = TARGETS
) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> metric -> {observed, target, met} for every target that applies to the variant.

    ``observed`` is the ratio of medians against the target's baseline (None if
    either is missing from the run) or the metric's median; ``met`` is None when
    it is unknown.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, row in table.items():
        mine: dict[str, dict[str, Any]] = {}
        for t in targets:
            if not applies(t, variant):
                continue
            if t.baseline is None:
                stat = row.get(t.metric)
                observed = None if stat is None else stat.median
            else:
                base = table.get(t.baseline)
                observed = ratio(row.get(t.metric), None if base is None else base.get(t.metric))
            mine[t.metric] = {
                "observed": observed,
                "baseline": t.baseline,
                "target": f"{t.op} {target_value(t)}",
                "met": t.met(observed),
            }
        if mine:
            out[variant] = mine
    return out


def target_value(t: Target) -> str:
    return f"{t.value:.1f}x" if t.baseline else f"{t.value:g}"


def target_note(t: Target, observed: float | None) -> str:
    """`` (>= 1.0x: no)``: the goal next to a figure, and whether it is met."""
    met = t.met(observed)
    word = "?" if met is None else "yes" if met else "no"
    return f" ({t.op} {target_value(t)}: {word})"


def mtus(runs: Sequence[Record]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for r in runs:
        if r.get("mtu") is not None:
            out[r["variant"]] = r["mtu"]
        else:
            out.setdefault(r["variant"], None)
    return out


# --- the daemon's exit stats line -------------------------------------------------------------------

_PAIR = re.compile(r"^(\w+)=(\d+)$")


def parse_stats(line: str) -> dict[str, Any]:
    """The counters of the daemon's ``stats:`` line (``name=value`` words): packets, drops, all counters."""
    counters = {m.group(1): int(m.group(2)) for m in map(_PAIR.match, line.split()) if m}
    if not counters:
        return {}
    out: dict[str, Any] = {k: counters[k] for k in ("tx_packets", "rx_packets") if k in counters}
    out["drops"] = {name: counters[name] for name in DROP_REASONS if name in counters}
    out["counters"] = counters
    return out


def daemon_drops(runs: Sequence[Record], variant: str) -> dict[str, float]:
    """Median over the rounds of each drop counter, summed over the variant's daemons; non-zero only."""
    per_round: list[dict[str, int]] = []
    for r in runs:
        if r["variant"] != variant or not r.get("daemons"):
            continue
        total: dict[str, int] = {}
        for d in r["daemons"]:
            for k, v in ((d.get("stats") or {}).get("drops") or {}).items():
                total[k] = total.get(k, 0) + v
        per_round.append(total)
    keys = sorted({k for t in per_round for k in t})
    medians = {k: statistics.median(t.get(k, 0) for t in per_round) for k in keys}
    return {k: v for k, v in medians.items() if v}


# --- formatting -----------------------------------------------------------------------------------


def fmt_number(value: float | None, count: bool = False) -> str:
    """About three significant figures; counts as 950, 53k, 1.2M."""
    if value is None:
        return "n/a"
    if count:
        if abs(value) < 1000:
            return f"{value:.0f}"
        if abs(value) < 1e6:
            return f"{value / 1e3:.0f}k"
        return f"{value / 1e6:.1f}M"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.1e}"


def fmt_stat(stat: Stat | None, count: bool = False) -> str:
    """``median (min-max)``, or just the median for a single round."""
    if stat is None:
        return "n/a"
    text = fmt_number(stat.median, count)
    if stat.n > 1:
        text += f" ({fmt_number(stat.lo, count)}-{fmt_number(stat.hi, count)})"
    return text


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def render_grid(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain-text table with aligned columns (first column left, the rest right), or markdown."""
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"
        lines = ["| " + " | ".join(headers) + " |", rule]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def tables(result: Record, markdown: bool = False) -> str:
    """The whole result as tables: figures, latency, cost, drops, then the ratios against each
    baseline in the run (against kernel VXLAN with issue 14's targets beside the ratios)."""
    runs = result["runs"]
    table = summary(runs)
    mtu = mtus(runs)
    absolute = {t.metric: t for t in TARGETS if t.baseline is None}

    def cell(variant: str, key: str) -> str:
        known = BY_NAME.get(variant)
        if key in CPU_COLUMNS and known is not None and known.backend is None:
            return "n/a"  # no daemon at all
        if key in DAEMON_DROP_COLUMNS and known is not None and known.kernel:
            return "n/a"  # the kernel's data path: the daemon counts nothing
        stat = table[variant][key]
        if stat is None:
            return MISSING
        text = fmt_stat(stat, METRICS[key].count)
        if key in absolute and applies(absolute[key], variant):
            text += target_note(absolute[key], stat.median)
        return text

    def grid(columns: Sequence[str], first: Sequence[tuple[str, Callable[[str], str]]] = ()) -> str:
        headers = ["variant", *(h for h, _ in first), *(METRICS[k].header for k in columns)]
        rows = [[v, *(f(v) for _, f in first), *(cell(v, k) for k in columns)] for v in table]
        return render_grid(headers, rows, markdown)

    parts = [
        grid(FIGURE_COLUMNS, [("MTU", lambda v: str(mtu.get(v) or "n/a"))]),
        grid(LATENCY_COLUMNS),
        grid(COST_COLUMNS),
        grid(DROP_COLUMNS),
    ]
    rel = ratios(table)
    for base in (b for b in BASELINES if b in table):
        goals = {t.metric: t for t in TARGETS if t.baseline == base}

        def ratio_cell(variant: str, key: str, base: str = base, goals: dict[str, Target] = goals) -> str:
            value = rel[variant][base][key]
            if value is None:
                return MISSING
            text = fmt_ratio(value)
            if key in goals and applies(goals[key], variant):
                text += target_note(goals[key], value)
            return text

        headers = ["ratio", *(f"{name} /{BASELINE_SHORT.get(base, base)}" for name in RATIO_COLUMNS.values())]
        rows = [[v, *(ratio_cell(v, k) for k in RATIO_COLUMNS)] for v in table]
        parts.append(render_grid(headers, rows, markdown))
    return "\n\n".join(parts)


def machine_description(machine: Mapping[str, Any]) -> str:
    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('nproc', '?')} CPUs, "
        f"Linux {machine.get('kernel', '?')}, Python {str(machine.get('python', '?')).split()[0]}, "
        f"iperf3 {machine.get('iperf3', '?')}"
    )


def machine_line(machine: Mapping[str, Any]) -> str:
    return f"{machine.get('date', '?')}: {machine_description(machine)}"


def config_line(config: Mapping[str, Any]) -> str:
    tests = config.get("tests") or ("tcp1", "tcp4", "udp", "ping")
    sizes = " and ".join(f"-l {n}" for t, n in (("udp", 64), ("udpbulk", 1400)) if t in tests)
    rr = f", sockperf ping-pong {config['udp_seconds']} s" if "rr" in tests else ""
    return (
        f"{config['rounds']} round(s), variant order rotated per round; iperf3 TCP {config['seconds']} s, "
        f"UDP {config['udp_seconds']} s (-u -b 0 {sizes or '-l 64'}){rr}, ping {config['ping_count']} x "
        f"{config['ping_interval']} s; figures are median (min-max) over rounds"
    )


NOTES = (
    "TCP x1/x4: iperf3 single stream / -P 4, received Gbit/s. UDP-64: 64-byte datagrams at -b 0, "
    "packets per second delivered to the receiver and loss %. UDP-1400: 1,400-byte datagrams at -b 0, "
    "payload Gbit/s and packets per second delivered, loss %.",
    "ping ms: median ICMP round trip. rr: sockperf UDP ping-pong (64-byte messages, one in flight) "
    "round trips in microseconds (--full-rtt): mean and sockperf's own p50/p99/p99.9 over its "
    "valid duration (warm-up excluded).",
    "CPU: utime+stime of both tunproxy processes together (/proc/PID/stat) during the test: seconds "
    "per GB of payload moved (TCP received, UDP delivered, rr and ping both ways), % of one core, "
    "microseconds per delivered 64-byte datagram. For vxlan and host-gw the daemon only programs the "
    "kernel and idles; the kernel's own CPU (softirq, encapsulation) is attributed to no process and "
    "is not counted. raw runs no daemon.",
    "retr: TCP retransmits (iperf3 JSON). tunproxy drops: the daemons' own drop counters (control "
    "socket, as `tunproxy status --json`) that grew during the test, both hosts; n/a where the kernel "
    "moves the packets. kernel drops: UDP RcvbufErrors/SndbufErrors/MemErrors (/proc/net/snmp) and "
    "every link's rx/tx dropped, both hosts (the receiving iperf3's socket included).",
    "Ratios are of medians (/batch1 = against udp-batch1); for rr and ping, lower is better. In "
    "parentheses: issue 14's target for tunproxy's userspace variants and whether this run meets it.",
    "Issue 14's targets for tunproxy udp: "
    + ", ".join(
        f"{METRICS[t.metric].header}{' /' + t.baseline if t.baseline else ''} {t.op} {target_value(t)}"
        for t in TARGETS
    )
    + ".",
    f"{MISSING}: not in this run (the test was not run, or the result was saved before it existed).",
)


def kernel_drops(runs: Sequence[Record], variant: str, test: str) -> dict[str, float]:
    """Median over the rounds of each kernel drop counter ("h2 udp RcvbufErrors") during one test."""
    per_round = []
    for r in runs:
        rec = (r.get("tests") or {}).get(test) or {}
        if r["variant"] == variant and "kernel_drops" in rec:
            per_round.append({f"{h} {k}": v for h, d in rec["kernel_drops"].items() for k, v in d.items()})
    keys = sorted({k for t in per_round for k in t})
    medians = {k: statistics.median(t.get(k, 0) for t in per_round) for k in keys}
    return {k: v for k, v in medians.items() if v}


def drops_lines(result: Record) -> list[str]:
    """Where packets were lost, per variant: the daemons' own counters and the kernel's."""

    def join(drops: Mapping[str, float]) -> str:
        return ", ".join(f"{k}={fmt_number(v, count=True)}" for k, v in drops.items())

    lines = []
    for variant in variants_of(result["runs"]):
        drops = daemon_drops(result["runs"], variant)
        if drops:
            lines.append(f"{variant}: tunproxy drop counters per round (median, both hosts): {join(drops)}")
        for test in ("tcp1", "tcp4", "udp", "udpbulk", "rr"):
            drops = kernel_drops(result["runs"], variant, test)
            if drops:
                lines.append(f"{variant}: kernel drops during {test} (median per round): {join(drops)}")
    return lines


def load_text(machine: Mapping[str, Any]) -> str:
    start, end = machine.get("loadavg_start"), machine.get("loadavg_end")
    if not start or not end:
        return ""
    return f" (load average {start[0]} at start, {end[0]} at end)"


def render_text(result: Record) -> str:
    parts = [
        machine_line(result["machine"]),
        config_line(result["config"]),
        "",
        tables(result),
        "",
        *NOTES,
        *drops_lines(result),
    ]
    return "\n".join(parts)


def render_markdown(result: Record, chart: str | None = None) -> str:
    parts = [
        "# Benchmark results",
        "",
        f"Measured {result['machine'].get('date', '?')} on {machine_description(result['machine'])}"
        f"{load_text(result['machine'])}.",
        "",
        "Two hosts are network namespaces joined by one veth (MTU 1500); each variant's overlay MTU is "
        "what its backend sets. " + config_line(result["config"]) + ".",
        "",
        tables(result, markdown=True),
        "",
        *(f"- {n}" for n in NOTES),
        *(f"- {line}" for line in drops_lines(result)),
    ]
    if chart:
        parts += ["", f"![chart]({chart})"]
    if result.get("source"):
        parts += ["", f"Raw figures: `{result['source']}`. Re-render with `python -m bench --report FILE`."]
    return "\n".join(parts) + "\n"
