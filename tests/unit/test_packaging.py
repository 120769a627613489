"""What ``pip install tunproxy`` installs: the daemon and its C extension, not the lab, demos or test models.

The wheel is built once (a few seconds: the cffi extension is compiled) from a
copy of this checkout, so the build does not write into the checkout; the copy
gets a module an older build would have left in ``build/lib``, which must not
ship.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a build leaves behind; the copy must hold every source file (lab/ and tests/ included).
LEFT_BY_BUILDS = shutil.ignore_patterns(
    ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache",
    ".mypy_cache", "*.so", "*.whl",
)  # fmt: skip
NOT_SHIPPED = re.compile(r"(^|/)(lab|tests)/|(^|/)(demo|demo_pods|podlab|lab|netns|headers|packets)\.py$")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    source = tmp_path_factory.mktemp("source") / "tunproxy"
    shutil.copytree(ROOT, source, ignore=LEFT_BY_BUILDS, symlinks=True)
    assert (source / "lab" / "netns.py").is_file() and (source / "tests" / "support" / "packets.py").is_file()
    # setuptools' build_lib: build/lib, or build/lib.<platform>-<tag> for a package with an extension
    for lib in ("lib", f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"):
        stale = source / "build" / lib / "tunproxy"
        stale.mkdir(parents=True)
        (stale / "removed_since.py").write_text("raise ImportError('left by an older build')\n")
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    build = subprocess.run(
        [sys.executable, "-m", *pip_wheel],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout[-2000:]}\n{build.stderr[-3000:]}"
    wheels = list(out.glob("tunproxy-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}: {wheels}"
    with zipfile.ZipFile(wheels[0]) as whl:
        return whl.namelist()


def test_the_wheel_holds_the_daemon_and_its_compiled_fast_path(wheel_files: list[str]) -> None:
    for module in ("tunproxy/__init__.py", "tunproxy/cli.py", "tunproxy/cni.py", "tunproxy/fastpath.py"):
        assert module in wheel_files
    assert "tunproxy/etcd/registry.py" in wheel_files and "tunproxy/backends/udp.py" in wheel_files
    assert [f for f in wheel_files if re.fullmatch(r"tunproxy/_fastpath_cffi\..*\.so", f)], wheel_files


def test_the_wheel_holds_no_lab_demo_or_test_model(wheel_files: list[str]) -> None:
    shipped = [f for f in wheel_files if NOT_SHIPPED.search(f)]
    assert not shipped, f"the wheel ships the lab, a demo or a test model: {shipped}"
    top = {f.split("/")[0] for f in wheel_files}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tunproxy"}, top


def test_what_an_older_build_left_in_build_lib_is_not_shipped(wheel_files: list[str]) -> None:
    assert "tunproxy/removed_since.py" not in wheel_files
    assert not [f for f in wheel_files if f.endswith((".c", ".h"))], "the wheel ships C sources"


def test_tunproxy_imports_neither_the_lab_nor_the_tests() -> None:
    """Installed alone, tunproxy would fail on such an import: lab/ and tests/ are not in the wheel."""
    found = []
    for path in sorted((ROOT / "tunproxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in ("lab", "tests", "bench", "fuzz")]  # fmt: skip
    assert not found, found
