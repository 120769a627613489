"""The import rules of ARCHITECTURE.md, checked: a module imports only from its own layer or a
lower-numbered one (listed before it in LAYERS), never from a later one.

An AST walk over every module of the package (imports inside functions
count too). A module added to the package must be placed in a layer here,
so the picture in ARCHITECTURE.md cannot quietly go out of date.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tunproxy"

# Each module's layer, in ARCHITECTURE.md's order: a layer never imports a later one.
LAYERS: dict[str, list[str]] = {
    # 1. the model: frozen values and pure rules, the stdlib only
    "model": ["model", "backend_config", "counters", "logonce"],
    # 2. the sans-IO core: decisions fed with values and `now`, returning values or actions
    "core": [
        "watcher",
        "observe",
        "cniconf",
        "etcd",
        "etcd.acquire",
        "etcd.values",
        "etcd.table",
        "etcd.keeper",
        "etcd.cursor",
        "etcd.endpoints",
        "etcd.retry",
    ],
    # 3. the fast path: the C boundary and the memory it works in
    "fastpath": ["fastpath", "fastpath_memory"],
    # 4. adapters: sockets, netlink, files, etcd, HTTP; each one thin
    "adapters": [
        "netlink",
        "leftovers",
        "supervise",
        "subnetenv",
        "control",
        "metrics",
        "ipmasq",
        "sdnotify",
        "drops",
        "peers",
        "peers.base",
        "peers.static",
        "etcd.connection",
        "etcd.watch_loop",
        "etcd.keep_loop",
        "etcd.registry",
        "etcd.listing",
    ],
    # 5. backends: lease -> forwarding state, through the fast path or the kernel
    "backends": [
        "backends",
        "backends.base",
        "backends.udp",
        "backends.udp_devices",
        "backends.udp_steering",
        "backends.udp_workers",
        "backends.vxlan",
        "backends.rules",
        "backends.host_gw",
    ],
    # 6. the daemon: one registry, one backend, the fold between; its window
    "daemon": ["daemon", "observer"],
    # 7. entry points
    "entry": ["cli", "flags", "cli_run", "cli_observe", "cni", "__main__", "__init__"],
}
ORDER = list(LAYERS)
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}

# Third-party and stdlib modules that do I/O or keep time: never in the model or the core.
IO_MODULES = {
    "asyncio", "socket", "subprocess", "fcntl", "os", "time", "select", "ssl", "threading",
    "aetcd", "grpc", "pyroute2", "pytun", "aiohttp", "prometheus_client", "uvloop", "cffi",
}  # fmt: skip
# Adapters that must not reach into the ones above them (a registry knows no backend).
FORBIDDEN = {
    "peers.base": {"backends", "daemon"},
    "peers.static": {"backends", "daemon"},
    "etcd.registry": {"backends", "daemon"},
    "etcd.watch_loop": {"backends", "daemon"},
    "etcd.keep_loop": {"backends", "daemon", "etcd.registry", "etcd.connection"},
    "netlink": {"peers", "backends"},
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports: ``tunproxy.x`` as ``x``, others by their top-level name."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    out: set[str] = set()
    for node in walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
                names = [f"{target}.{a.name}" if target else a.name for a in node.names]
                found = [n for n in names if n in MODULES] or [target]  # a module, or names in one
                out.update(f"tunproxy.{n}" if n else "tunproxy" for n in found)
            elif node.module:
                out.add(node.module)
    own = {m.removeprefix("tunproxy.") for m in out if m == "tunproxy" or m.startswith("tunproxy.")}
    others = {m.split(".")[0] for m in out if not m.startswith("tunproxy")}
    return {m for m in own if m != "tunproxy"} | others


def walk(node: ast.AST):
    """ast.walk, but not into ``if TYPE_CHECKING:`` (annotations are not imports at run time)."""
    yield node
    for child in ast.iter_child_nodes(node):
        test = child.test if isinstance(child, ast.If) else None
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            continue
        yield from walk(child)


MODULES = modules()


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER_OF)) == []
    assert sorted(set(LAYER_OF) - set(MODULES)) == []  # a layer names no module that is gone


def test_the_walk_sees_imports_inside_a_subpackage(tmp_path):
    source = tmp_path / "keeper.py"
    source.write_text(
        "import asyncio\n"
        "from . import cursor\n"
        "from .connection import Client\n"
        "from ..backends import udp\n"
        "from ..model import Lease\n"
        "from tunproxy.fastpath import FastPath\n"
        "if TYPE_CHECKING:\n"
        "    from .registry import EtcdRegistry\n"
    )
    found = imports("etcd.keeper", source)
    assert found == {"asyncio", "etcd.cursor", "etcd.connection", "backends.udp", "model", "fastpath"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downhill(name):
    layer = ORDER.index(LAYER_OF[name])
    for target in sorted(imports(name, MODULES[name])):
        if target in ("_fastpath_cffi",):
            assert LAYER_OF[name] == "fastpath", f"{name} reaches the C directly"
            continue
        if target in ("lab", "tests", "bench", "fuzz"):
            pytest.fail(f"{name} imports {target}: the package must run without the lab")
        if target in LAYER_OF:
            above = ORDER.index(LAYER_OF[target])
            assert above <= layer, (  # its own layer or an earlier one
                f"{name} ({LAYER_OF[name]}) imports {target} ({LAYER_OF[target]})"
            )
            for prefix in FORBIDDEN.get(name, ()):
                assert not target.startswith(prefix), f"{name} must not import {target}"
        elif LAYER_OF[name] in ("model", "core"):
            assert target not in IO_MODULES, f"{name} is pure but imports {target}"
