"""Fixtures shared by the tiers: a namespace lab and a real etcd, both cleaned up by PID/name."""

from __future__ import annotations

import os
import shutil

import pytest

from lab.etcd import EtcdServer
from lab.netns import Lab, cleanup_dead_labs

IS_ROOT = os.geteuid() == 0
HAS_ETCD = shutil.which("etcd") is not None and shutil.which("etcdctl") is not None


IN_CI = bool(os.environ.get("CI"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Namespaces of a test run that was killed before its teardown go first: a lab left by a
    dead process would otherwise sit on the machine (and in the way) for ever."""
    if IS_ROOT:
        for name in cleanup_dead_labs("tpl"):
            print(f"removed namespace {name}, left by a test run that was killed")


def _skip_reason(longrepr: object) -> str:
    """The reason out of a skip's longrepr, which is (path, line, "Skipped: reason") or a string."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """In CI (``CI`` set) a skipped test fails, in one line saying why: a tier that did not run
    (no root, no etcd, no offload, no openssl) must not pass unnoticed."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = _skip_reason(report.longrepr)
        report.longrepr = f"CI is set, so a skip is a failure: {item.nodeid} skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    """The same for a whole module skipped while it is collected."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            f"CI is set, so a skip is a failure: {collector.nodeid} skipped: {_skip_reason(report.longrepr)}"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root for namespaces and TUN"))
        if "etcd" in item.keywords and not HAS_ETCD:
            item.add_marker(
                pytest.mark.skip(reason="needs etcd and etcdctl (apt install etcd-server etcd-client)")
            )


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture
def etcd():
    with EtcdServer() as server:
        yield server
