"""The libFuzzer targets (fuzz/) build and run clean for a bounded time.

Each target is built afresh under AddressSanitizer and UndefinedBehaviorSanitizer
and run for FUZZ_CI_SECONDS from the committed seeds: a crash, a sanitizer
report or a failed harness check is a finding and fails the test. Long runs
are ``make fuzz FUZZ_SECONDS=...``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fuzz.__main__ import FUZZ, TARGETS, run

SECONDS = float(os.environ.get("FUZZ_CI_SECONDS", "15"))


@pytest.fixture(scope="module", autouse=True)
def clang():
    if shutil.which("clang") is None and not os.environ.get("CC_FUZZ"):
        if os.environ.get("CI"):
            pytest.fail("clang is missing: CI must run the fuzzers (.ci/run installs clang)", pytrace=False)
        pytest.skip("clang not installed (apt-get install clang)")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target, tmp_path: Path):
    seeds = sorted((FUZZ / "corpus" / target).iterdir())
    assert seeds, f"no seed corpus for {target}"
    result = run(target, SECONDS, where=tmp_path)
    log = (tmp_path / f"{target}.log").read_text()
    assert result.findings == 0, f"{target}: finding {result.crash}\n{log[-4000:]}"
    assert result.inputs > len(seeds), log[-2000:]  # it ran, past the seeds
    assert list(tmp_path.glob(f"crash-{target}-*")) == []
