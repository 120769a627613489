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

from .plan import BASELINES, BY_NAME

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


def _get(test: str, key: str, scale: float = 1.0) -> Callable[[Record], float | None]:
    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        value = rec.get(key)
        return None if value is None else value * scale

    return extract


def _cpu_per_gb(test: str) -> Callable[[Record], float | None]:
    def extract(tests: Record) -> float | None:
        rec = tests.get(test) or {}
        return cpu_seconds_per_gb(rec.get("proxy_cpu_s"), rec.get("received_bytes"))

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
        Metric("udp_loss_pct", "UDP loss %", _get("udp", "lost_percent")),
        Metric("ping_ms", "ping ms", _get("ping", "median_ms")),
        Metric("tcp1_retransmits", "TCP x1 retr", _get("tcp1", "retransmits"), count=True),
        Metric("tcp4_retransmits", "TCP x4 retr", _get("tcp4", "retransmits"), count=True),
        Metric("tcp1_cpu_s_per_gb", "CPU s/GB (TCP x1)", _cpu_per_gb("tcp1")),
        Metric("tcp4_cpu_s_per_gb", "CPU s/GB (TCP x4)", _cpu_per_gb("tcp4")),
        Metric("tcp1_cpu_pct", "CPU % (TCP x1)", _cpu_pct("tcp1")),
        Metric("udp_cpu_us_per_pkt", "CPU us/pkt (UDP)", _cpu_us_per_packet),
    )
}
# Two tables of figures (what a variant delivers, what it costs) and one of ratios.
FIGURE_COLUMNS = ("tcp1_gbps", "tcp4_gbps", "udp_kpps", "udp_loss_pct", "ping_ms")
COST_COLUMNS = (
    "tcp1_retransmits",
    "tcp4_retransmits",
    "tcp1_cpu_s_per_gb",
    "tcp1_cpu_pct",
    "udp_cpu_us_per_pkt",
)
CPU_COLUMNS = {"tcp1_cpu_s_per_gb", "tcp4_cpu_s_per_gb", "tcp1_cpu_pct", "udp_cpu_us_per_pkt"}
RATIO_COLUMNS = {"tcp1_gbps": "TCP x1", "tcp4_gbps": "TCP x4", "udp_kpps": "UDP pps", "ping_ms": "ping"}
BASELINE_SHORT = {"vxlan": "vxlan", "udp-batch1": "batch1"}


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
    """The figures, the costs and the ratios for a whole result, as three tables."""
    runs = result["runs"]
    table = summary(runs)
    mtu = mtus(runs)

    def cell(variant: str, key: str) -> str:
        if key in CPU_COLUMNS and variant in BY_NAME and BY_NAME[variant].backend is None:
            return "n/a"  # no daemon at all
        return fmt_stat(table[variant][key], METRICS[key].count)

    headers = ["variant", "MTU", *(METRICS[k].header for k in FIGURE_COLUMNS)]
    rows = [[v, str(mtu.get(v) or "n/a"), *(cell(v, k) for k in FIGURE_COLUMNS)] for v in table]
    parts = [render_grid(headers, rows, markdown)]
    headers = ["variant", *(METRICS[k].header for k in COST_COLUMNS)]
    rows = [[v, *(cell(v, k) for k in COST_COLUMNS)] for v in table]
    parts.append(render_grid(headers, rows, markdown))

    rel = ratios(table)
    bases = [b for b in BASELINES if b in table]
    if bases:
        headers = ["ratio"] + [
            f"{name} /{BASELINE_SHORT.get(b, b)}" for name in RATIO_COLUMNS.values() for b in bases
        ]
        rows = [[v] + [fmt_ratio(rel[v][b][k]) for k in RATIO_COLUMNS for b in bases] for v in table]
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
    return (
        f"{config['rounds']} round(s), variant order rotated per round; iperf3 TCP {config['seconds']} s, "
        f"UDP {config['udp_seconds']} s (-u -b 0 -l 64), ping {config['ping_count']} x "
        f"{config['ping_interval']} s; figures are median (min-max) over rounds"
    )


NOTES = (
    "TCP x1/x4: iperf3 single stream / -P 4, received Gbit/s. UDP-64: 64-byte datagrams at -b 0, "
    "packets per second delivered to the receiver and loss %. ping ms: median round trip.",
    "retr: TCP retransmits (iperf3 JSON). CPU: utime+stime of both tunproxy processes together "
    "(/proc/PID/stat) during the test: seconds per GB received, % of one core, microseconds per "
    "delivered packet. For vxlan and host-gw the daemon only programs the kernel and idles; the "
    "kernel's own CPU (softirq, encapsulation) is attributed to no process and is not counted. "
    "raw runs no daemon.",
    "Ratios are of medians (/batch1 = against udp-batch1); for ping, lower is better.",
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
        for test in ("tcp1", "udp"):
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
