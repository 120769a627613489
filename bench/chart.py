"""A PNG of the results table: one panel per figure, a bar per variant, whiskers from min to max."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import report

PANELS = (
    ("tcp1_gbps", "TCP, 1 stream (Gbit/s)"),
    ("tcp4_gbps", "TCP, 4 streams (Gbit/s)"),
    ("udp_kpps", "64-byte UDP delivered (kpps)"),
    ("udpbulk_gbps", "1,400-byte UDP delivered (Gbit/s)"),
    ("rr_mean_us", "sockperf ping-pong mean round trip (us, lower is better)"),
    ("rr_p999_us", "sockperf ping-pong p99.9 round trip (us, lower is better)"),
    ("ping_ms", "ping round trip (ms, lower is better)"),
    ("tcp1_cpu_s_per_gb", "tunproxy CPU s per GB, TCP 1 stream (lower is better)"),
)
COLORS = {
    "raw": "#7f7f7f",
    "vxlan": "#1f77b4",
    "host-gw": "#17becf",
    "udp": "#d62728",
    "udp-batch1": "#ff9896",
    "udp-nooffload": "#e377c2",
}


def save(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report.summary(result["runs"])
    variants = list(table)
    panels = [(k, t) for k, t in PANELS if any(table[v][k] for v in variants)] or list(PANELS[:1])
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6.0 * cols, rows * (0.45 * len(variants) + 1.4) + 0.8))
    axes = list(grid.flat) if hasattr(grid, "flat") else [grid]
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes, panels, strict=False):
        stats = [table[v][key] for v in variants]
        medians = [s.median if s else 0.0 for s in stats]
        lows = [s.median - s.lo if s else 0.0 for s in stats]
        highs = [s.hi - s.median if s else 0.0 for s in stats]
        ys = list(range(len(variants)))
        ax.barh(
            ys,
            medians,
            xerr=[lows, highs],
            color=[COLORS.get(v, "#9467bd") for v in variants],
            capsize=3,
            error_kw={"elinewidth": 1},
        )
        for y, s in zip(ys, stats, strict=True):
            label = " " + (report.fmt_number(s.median) if s else "n/a")
            ax.text(s.hi if s else 0.0, y, label, va="center", fontsize=8)
        ax.set_yticks(ys, variants)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.margins(x=0.18)
        ax.grid(axis="x", alpha=0.3)
    cfg = result["config"]
    fig.suptitle(
        f"tunproxy bench: {report.machine_line(result['machine'])}\n"
        f"median of {cfg['rounds']} round(s), whiskers min-max",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
