"""What the bench runs: the variants, the tests, and the interleaved schedule (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

# tcp1/tcp4: iperf3 TCP, 1 and 4 streams. udp: iperf3 64-byte datagrams at -b 0 (the flood).
# udpbulk: iperf3 1,400-byte datagrams at -b 0. rr: sockperf UDP ping-pong (request/response
# latency). ping: ICMP echo.
TESTS = ("tcp1", "tcp4", "udp", "udpbulk", "rr", "ping")


@dataclass(frozen=True)
class Variant:
    """One way of carrying traffic between the two hosts.

    ``backend`` None is the bare underlay: no tunproxy runs and iperf3 talks
    to the peer's underlay address. ``kernel`` says the data path is the
    kernel's, so the daemon idles and its CPU time says nothing.
    """

    name: str
    label: str
    backend: str | None
    args: tuple[str, ...] = ()
    kernel: bool = True
    scrape: bool = False  # GET h1's /metrics once a second while the variant runs


# flannel's C proxy moves one packet per system call; with tunproxy's offloads on, one TUN read
# can carry a 64 KiB TCP segment, so that design is --batch 1 with offloads off.
VARIANTS: tuple[Variant, ...] = (
    Variant("raw", "raw veth underlay (upper bound)", None),
    Variant("vxlan", "tunproxy vxlan (kernel VXLAN)", "vxlan"),
    Variant("host-gw", "tunproxy host-gw (kernel routes)", "host-gw"),
    Variant("udp", "tunproxy udp, C fast path, defaults", "udp", kernel=False),
    Variant(
        "udp-batch1",
        "tunproxy udp --batch 1 --no-offload (the flannel C proxy's design)",
        "udp",
        ("--batch", "1", "--no-offload"),
        kernel=False,
    ),
    Variant("udp-no-fast-csum", "tunproxy udp --without fast-csum", "udp", ("--without", "fast-csum"), False),
    Variant("udp-nooffload", "tunproxy udp --no-offload (batched only)", "udp", ("--no-offload",), False),
    Variant(
        "udp-no-uso",
        "tunproxy udp --without uso (no UDP trains on the TUN)",
        "udp",
        ("--without", "uso"),
        False,
    ),
    # The cost of being observable: the drop ring on and /metrics scraped every second, against
    # neither. Not in the default run; `python -m bench --variants udp-observed,udp-unobserved`.
    Variant(
        "udp-observed",
        "tunproxy udp, drop ring + /metrics scraped every 1 s",
        "udp",
        ("--healthz-port", "9464"),
        kernel=False,
        scrape=True,
    ),
    Variant("udp-unobserved", "tunproxy udp, no drop ring, no HTTP", "udp", ("--drop-ring", "0"), False),
    # Several cores (issue 14): a TUN queue, an SO_REUSEPORT socket and a thread per worker.
    Variant("udp-workers1", "tunproxy udp --workers 1", "udp", ("--workers", "1"), False),
    Variant("udp-workers2", "tunproxy udp --workers 2", "udp", ("--workers", "2"), False),
    Variant(
        "udp-workers2-nosteer",
        "tunproxy udp --workers 2 --without flow-steering (the kernel's reuseport hash)",
        "udp",
        ("--workers", "2", "--without", "flow-steering"),
        False,
    ),
    # Fewer wake-ups (issue 14): each speed-up off, against the defaults ("udp").
    Variant("udp-no-drain", "tunproxy udp --without drain", "udp", ("--without", "drain"), kernel=False),
    Variant("udp-no-c-loop", "tunproxy udp --without c-loop", "udp", ("--without", "c-loop"), kernel=False),
)
BY_NAME = {v.name: v for v in VARIANTS}
# What `python -m bench` runs unless --variants says otherwise.
DEFAULT_VARIANTS = (
    "raw",
    "vxlan",
    "host-gw",
    "udp",
    "udp-nooffload",
    "udp-batch1",
    # Issue 14's speed-ups, each off against "udp" (on), and two workers against one.
    "udp-no-fast-csum",
    "udp-no-uso",
    "udp-no-drain",
    "udp-no-c-loop",
    "udp-workers2",
)

# The ratio columns: everything against kernel VXLAN, and against one packet per system call.
BASELINES = ("vxlan", "udp-batch1")


@dataclass(frozen=True)
class Target:
    """A goal of issue 14 for the tunproxy (userspace) variants.

    ``metric`` is a key of ``report.METRICS``; with ``baseline`` set the goal is
    on the ratio of medians against that variant (``0.81x (>= 1.0x: no)``),
    without it on the metric's median itself (``0.52 (<= 0.45: no)``).
    ``op`` is ``>=`` or ``<=``.
    """

    metric: str
    op: str
    value: float
    baseline: str | None = "vxlan"

    def met(self, observed: float | None) -> bool | None:
        """Whether ``observed`` (a ratio or a median) meets the goal; None when it is unknown."""
        if observed is None:
            return None
        return observed >= self.value if self.op == ">=" else observed <= self.value


# Issue 14, "Userspace at kernel speed", as ratios in one run (medians over interleaved rounds).
TARGETS: tuple[Target, ...] = (
    Target("tcp1_gbps", ">=", 1.0),
    Target("tcp4_gbps", ">=", 0.5),
    Target("udp_kpps", ">=", 1.2),
    Target("udpbulk_gbps", ">=", 0.8),
    Target("rr_mean_us", "<=", 2.5),
    Target("rr_p999_us", "<=", 4.0),
    Target("tcp1_cpu_s_per_gb", "<=", 0.45, None),  # both daemons together
    Target("udp_daemon_drops", "<=", 0, None),  # the flood: the daemons' own drop counters stay at 0
)


@dataclass(frozen=True)
class Step:
    """One measurement: test ``test`` of ``variant`` in ``round`` (1-based)."""

    index: int
    round: int
    variant: str
    test: str


def round_order(variants: tuple[str, ...] | list[str], round_no: int) -> list[str]:
    """The variants in the order round ``round_no`` (1-based) runs them: rotated by one per round.

    So no variant is always first (fresh caches, a quiet neighbour) or always
    last, and slow drift on a shared machine hits every variant alike.
    """
    if not variants:
        return []
    shift = (round_no - 1) % len(variants)
    return list(variants[shift:]) + list(variants[:shift])


def schedule(
    variants: tuple[str, ...] | list[str], rounds: int, tests: tuple[str, ...] = TESTS
) -> list[Step]:
    """Every step of a run, in order; a variant's tests run back to back while its daemons are up."""
    steps: list[Step] = []
    for r in range(1, rounds + 1):
        for name in round_order(variants, r):
            for test in tests:
                steps.append(Step(len(steps) + 1, r, name, test))
    return steps
