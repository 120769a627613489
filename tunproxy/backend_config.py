"""Each backend's options, typed: the net config's ``Backend`` section and the udp flags.

How it works. ``BACKEND_TYPES`` is the one list of backend names, each with
the frozen dataclass its ``Backend`` section parses into. ``NetworkConfig.parse``
(tunproxy.model) calls ``parse_backend``, so a config whose options are wrong
is refused where it is read, before anything needs root, and a backend is
handed values that are already valid. The udp backend's command-line knobs
travel as ``UdpFlags``, whose defaults and ranges are written here once (the
CLI's converters use them too).

Types, ranges and defaults are flannel's (Documentation/backends.md).
Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

UDP_DEFAULT_PORT = 8285  # flannel's udp default
VXLAN_DEFAULT_PORT = 8472  # the kernel's (and flannel's) default, not IANA's 4789
VXLAN_DEFAULT_VNI = 1
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MAX_VNI = (1 << 24) - 1
MIN_MTU = 68  # RFC 791: every IPv4 link carries 68 bytes
DEFAULT_BACKEND = "udp"


class ConfigError(ValueError):
    """A network config, CIDR, flag or peer list that cannot be used; the message is user-facing."""


def int_option(options: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """A Backend integer option; JSON true/false or 1.5 is refused rather than coerced (ConfigError)."""
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"Backend.{key} must be an integer from {low} to {high}, not {value!r}")
    return value


def bool_option(options: Mapping[str, Any], key: str) -> bool:
    """A Backend boolean option, false when absent; ConfigError for anything but true/false."""
    value = options.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"Backend.{key} must be true or false, not {value!r}")
    return value


@dataclass(frozen=True)
class BackendOptions:
    """The ``Backend`` section of a net config, parsed for one type.

    ``raw`` is the section as written (without ``Type``), kept so the config
    can be written back; ``warnings`` has one line per option flannel knows
    and this backend ignores, or that flannel does not know.
    """

    KNOWN: ClassVar[tuple[str, ...]] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> BackendOptions:
        """Validate ``raw``; ConfigError naming the option if a value is wrong."""
        return cls(raw=dict(raw), warnings=tuple(cls._unknown(raw)))

    @classmethod
    def _unknown(cls, raw: Mapping[str, Any]) -> list[str]:
        name = next(k for k, v in BACKEND_TYPES.items() if v is cls)
        unknown = [key for key in raw if key not in cls.KNOWN]
        return [f"ignoring Backend.{key}: not an option of the {name} backend" for key in unknown]


@dataclass(frozen=True)
class UdpOptions(BackendOptions):
    """udp's ``Port`` (8285; 0 means the default, as in flannel)."""

    KNOWN: ClassVar[tuple[str, ...]] = ("Port",)
    port: int = UDP_DEFAULT_PORT
    port_given: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> UdpOptions:
        """ConfigError if ``Port`` is not an integer from 0 to 65535; 0 or absent is 8285."""
        port = int_option(raw, "Port", UDP_DEFAULT_PORT, 0, 65535) or UDP_DEFAULT_PORT
        return cls(dict(raw), tuple(cls._unknown(raw)), port, "Port" in raw)


@dataclass(frozen=True)
class VxlanOptions(BackendOptions):
    """vxlan's ``VNI`` (1), ``Port`` (8472; 0 means the default), ``GBP``, ``DirectRouting``, ``MTU``.

    ``mtu`` is flannel's ``MTU``: the MTU of the encapsulated packets on the
    underlay (the device gets ``mtu - 50``), None for the underlay's own, so
    the backend settles it against the underlay. ``Learning`` is accepted
    and ignored with a warning (tunproxy writes every entry); ``MacPrefix``
    is flannel's on Windows only.
    """

    KNOWN: ClassVar[tuple[str, ...]] = ("VNI", "Port", "GBP", "DirectRouting", "MTU", "Learning", "MacPrefix")
    vni: int = VXLAN_DEFAULT_VNI
    port: int = VXLAN_DEFAULT_PORT
    gbp: bool = False
    direct_routing: bool = False
    mtu: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> VxlanOptions:
        """ConfigError naming the option for a bad value; ``Learning`` and ``MacPrefix`` only warn."""
        warnings = []
        if bool_option(raw, "Learning"):
            warnings.append(
                "ignoring Backend.Learning: tunproxy writes every neighbour and FDB entry, learning stays off"
            )
        if "MacPrefix" in raw:
            warnings.append("ignoring Backend.MacPrefix: flannel uses it on Windows only")
        warnings += cls._unknown(raw)
        mtu = int_option(raw, "MTU", 0, MIN_MTU + VXLAN_OVERHEAD, 65535) if "MTU" in raw else None
        return cls(
            dict(raw),
            tuple(warnings),
            vni=int_option(raw, "VNI", VXLAN_DEFAULT_VNI, 0, MAX_VNI),
            port=int_option(raw, "Port", VXLAN_DEFAULT_PORT, 0, 65535) or VXLAN_DEFAULT_PORT,
            gbp=bool_option(raw, "GBP"),
            direct_routing=bool_option(raw, "DirectRouting"),
            mtu=mtu,
        )


@dataclass(frozen=True)
class HostGwOptions(BackendOptions):
    """host-gw has no options."""


BACKEND_TYPES: dict[str, type[BackendOptions]] = {
    "udp": UdpOptions,
    "vxlan": VxlanOptions,
    "host-gw": HostGwOptions,
}
"""Every backend by flannel's name: the one list (the CLI's choices, the config check, the lookup)."""


def parse_backend(backend_type: object, raw: Mapping[str, Any]) -> BackendOptions:
    """The typed options of ``Backend`` for ``backend_type``; ConfigError for an unknown type or bad value."""
    if not isinstance(backend_type, str) or backend_type not in BACKEND_TYPES:
        raise ConfigError(f"Backend.Type {backend_type!r} is not one of {', '.join(BACKEND_TYPES)}")
    return BACKEND_TYPES[backend_type].parse(raw)


# --- the udp backend's flags -------------------------------------------------------------------

FEATURES: dict[str, str] = {
    "multiqueue": "with --workers N > 1: a multi-queue TUN (IFF_MULTI_QUEUE), a queue, an SO_REUSEPORT "
    "socket and a thread per worker; off or refused, one worker",
    "flow-steering": "with --workers N > 1: a classic BPF program on the SO_REUSEPORT group hands a "
    "datagram to the worker of its inner flow (off or refused: the kernel's hash of the outer ports)",
    "uso": "UDP segmentation offload on the TUN (TUN_F_USO4/USO6, kernel 6.2+): UDP in trains both ways",
    "fast-csum": "offload mode's checksums with AVX2 where the CPU has it, summed while copied (one pass)",
    "drain": "after writing to the TUN, read it at once for the replies the kernel made (ACKs, echo "
    "replies) rather than after an epoll round trip; skipped while it finds none",
    "c-loop": "each worker's thread waits in C (epoll) and moves both directions there, so a "
    "wake-up costs no Python; off or refused, Python wakes the C once per wake-up (the event "
    "loop with one worker, each worker's thread with more)",
}
"""The udp data path's optional speed-ups, by name: each is on by default where the kernel
allows it, ``--without NAME`` turns it off (the bench's "off" rows), and ``--refuse NAME``
makes tunproxy act as if the kernel had refused it, so the fallback path can be tested."""

BATCH_DEFAULT = 64
BATCH_MAX = 1024  # packets per system call; the fast path's slots are allocated for this many
DROP_RING_DEFAULT = 256
DROP_RING_MAX = 65536
MAX_ROUTES = 1 << 20  # --max-routes' ceiling: the fast path's table never grows past it
DEFAULT_TUN = "tunproxy0"
WORKERS_MAX = 64  # threads, TUN queues and sockets; the kernel allows 256 queues (MAX_TAP_QUEUES)
WORKERS_CORES_PER_WORKER = 2  # see default_workers
WORKERS_DEFAULT_MAX = 4
MIN_DEFAULT_ROUTES = 4096


def default_max_routes(subnets: int) -> int:
    """Routes the udp backend holds by default, for a network of ``subnets`` SubnetLen subnets:
    every one of them, at least 4096, at most ``MAX_ROUTES``.

    That covers every lease the network config lets hosts take, and leases
    outside SubnetMin-SubnetMax (reservations, older configs). Leases of
    other lengths can still exceed it; past the limit a lease is logged once
    and added when room frees. The table grows as it fills, so a large limit
    costs no memory until the peers are there.
    """
    return min(MAX_ROUTES, max(MIN_DEFAULT_ROUTES, subnets))


def default_workers(cpus: int | None) -> int:
    """``--workers`` when not given, for a host with ``cpus`` usable CPUs (None: unknown).

    One worker per two CPUs, at most 4: each worker's thread shares the
    cores with the applications whose packets it carries. On 2 CPUs (both
    daemons and iperf3 on them, issue 14's bench) a second worker bought
    nothing: TCP x4 0.47x vs 0.56x of kernel VXLAN in one run, 0.61x vs
    0.61x in another, TCP x1 as noisy either way; so hosts with up to 3 CPUs
    keep one worker (one c-loop thread, or the event loop itself without the
    c-loop). Above that the rule is not measured
    here (no such host); ``--workers`` overrides it.
    """
    if not cpus or cpus < 1:
        return 1
    return max(1, min(WORKERS_DEFAULT_MAX, cpus // WORKERS_CORES_PER_WORKER))


@dataclass(frozen=True)
class UdpFlags:
    """``tunproxy run``'s udp backend flags, already converted and range-checked by the CLI.

    ``port`` None means ``Backend.Port``; ``max_routes`` 0 means the default
    (``default_max_routes``); ``workers`` None means
    ``default_workers`` of the CPUs this process may run on (1 is one worker on
    the one TUN queue, more a thread per TUN queue: tunproxy.backends.udp_workers). ``sources`` maps each
    field that was given to the flag or variable it came from, so a warning
    or an error names what the user wrote.
    """

    port: int | None = None
    batch: int = BATCH_DEFAULT
    tun_name: str = DEFAULT_TUN
    max_routes: int = 0
    drop_ring: int = DROP_RING_DEFAULT
    offload: bool = True
    allow_any_source: bool = False
    workers: int | None = None
    without: frozenset[str] = frozenset()
    refuse: frozenset[str] = frozenset()
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def wants(self, feature: str) -> bool:
        """True unless ``--without feature`` was given (see ``FEATURES``)."""
        return feature not in self.without

    def source(self, name: str) -> str:
        """The flag or variable ``name`` came from, else its flag spelling."""
        return self.sources.get(name, "--" + name.replace("_", "-"))

    def port_for(self, options: UdpOptions) -> tuple[int, str | None]:
        """The port: the flag's, else ``Backend.Port``, else 8285; a warning when they differ.

        Every host of a network must use one port, so the flag overriding a
        different ``Backend.Port`` is worth one line.
        """
        if self.port is None:
            return options.port, None
        if options.port_given and options.port != self.port:
            return self.port, (
                f"{self.source('port')} {self.port} overrides Backend.Port {options.port}; "
                "every host must use one port"
            )
        return self.port, None


UDP_ONLY = tuple(f.name for f in fields(UdpFlags) if f.name != "sources")
"""The udp backend's flags (fields of UdpFlags); another backend ignores them, with a warning."""


@dataclass(frozen=True)
class UdpSettings:
    """The udp backend's settings, settled once from its ``Backend`` options, the flags and the
    host by ``resolve``, its one maker: what the backend and its fast path read, with nothing
    left to merge (the defaults are the flags').

    ``workers`` is what is asked of the kernel (it may give fewer TUN queues);
    ``c_loop``, ``drain``, ``fast_csum``, ``uso`` and ``flow_steering`` are the
    ``FEATURES`` left on; ``simd`` False keeps fast-csum off AVX2 (``--refuse
    fast-csum``); ``refuse`` the features to treat as refused by the kernel
    where it is asked (multiqueue, uso, flow-steering); ``warnings`` one line each to log.
    """

    tun_name: str
    port: int
    batch: int
    offload: bool
    allow_any_source: bool
    max_routes: int
    drop_ring: int
    workers: int
    c_loop: bool
    drain: bool
    fast_csum: bool
    simd: bool
    uso: bool
    flow_steering: bool
    refuse: frozenset[str]
    warnings: tuple[str, ...]

    @classmethod
    def resolve(cls, options: UdpOptions, flags: UdpFlags, *, cpus: int | None, subnets: int) -> UdpSettings:
        """Settle ``flags`` against ``options`` for a host with ``cpus`` usable CPUs (None:
        unknown) and a network of ``subnets`` SubnetLen subnets: the port (``port_for``),
        ``max_routes`` 0 as ``default_max_routes``, ``workers`` None as ``default_workers``
        (1 without ``multiqueue``), and each feature on unless ``--without``; a refused
        c-loop is off, with a warning (no kernel refuses it, so nothing later would say so)."""
        port, warning = flags.port_for(options)
        warnings = [warning] if warning else []
        c_loop = flags.wants("c-loop") and "c-loop" not in flags.refuse
        if flags.wants("c-loop") and not c_loop:
            warnings.append("c-loop refused (--refuse c-loop): Python wakes the fast path per wake-up")
        workers = (flags.workers or default_workers(cpus)) if flags.wants("multiqueue") else 1
        return cls(
            tun_name=flags.tun_name,
            port=port,
            batch=flags.batch,
            offload=flags.offload,
            allow_any_source=flags.allow_any_source,
            max_routes=flags.max_routes or default_max_routes(subnets),
            drop_ring=flags.drop_ring,
            workers=workers,
            c_loop=c_loop,
            drain=flags.wants("drain"),
            fast_csum=flags.wants("fast-csum"),
            simd="fast-csum" not in flags.refuse,  # refused: as on a CPU without AVX2
            uso=flags.wants("uso"),
            flow_steering=flags.wants("flow-steering"),
            refuse=flags.refuse,
            warnings=tuple(warnings),
        )
