"""Build the libFuzzer targets and run each for a given time: ``make fuzz FUZZ_SECONDS=600``.

    python3 -m fuzz [--seconds 60] [--targets packets,routes] [--out bench/results]

Each target (fuzz_<target>.c with tunproxy/fastpath_c/*.c, unchanged) is built
with clang -fsanitize=fuzzer,address,undefined into build/fuzz/, then run on
one job for ``--seconds`` from the committed seeds (fuzz/corpus/<target>/,
only read) plus a working corpus in build/fuzz/corpus-<target>/ (where new
inputs go; it persists between runs, so long runs build on each other). A
crash, a sanitizer report or a failed check stops a target; the input is
written to build/fuzz/crash-<target>-*.

Prints one table row per target (inputs executed, seconds, inputs per
second, coverage, findings) and writes the same as JSON to
``--out``/fuzz-<UTC time>.json. Exit status 1 if any target found something,
2 if clang cannot build it (one line saying why).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
FASTPATH = ROOT / "tunproxy" / "fastpath_c"
BUILD = ROOT / "build" / "fuzz"
TARGETS = ("packets", "routes")
CFLAGS = ("-g", "-O1", "-fno-sanitize-recover=undefined", "-Wall", "-Wextra")
SANITIZE = "-fsanitize=address,undefined"
SANITIZE_COVERAGE = "-fsanitize=fuzzer-no-link,address,undefined"
LINK = "-fsanitize=fuzzer,address,undefined"
# packets: the UDP socket is a shim (see fuzz_packets.c); the TUN is a real socketpair.
LDFLAGS = {"packets": ("-Wl,--wrap=sendmmsg,--wrap=recvmmsg,--wrap=sendto",), "routes": ()}
MAX_LEN = {"packets": 8192, "routes": 1024}


class BuildError(Exception):
    """clang is missing or refused to build a target."""


@dataclass(frozen=True)
class Result:
    target: str
    inputs: int
    seconds: float
    inputs_per_second: float
    coverage: int
    findings: int
    crash: str | None


def compiler() -> str:
    cc = os.environ.get("CC_FUZZ") or shutil.which("clang")
    if not cc:
        raise BuildError("clang not found (apt-get install clang)")
    return cc


def _cc(argv: list[str], target: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"building fuzz target {target} failed: {done.stderr.strip()[-2000:]}")


def build(target: str, where: Path = BUILD) -> Path:
    """The target's binary, rebuilt if any source is newer.

    Only the fast path gets coverage instrumentation (the harness's own loops
    and checks would only add noise and cost); both get the sanitizers.
    """
    out = where / target
    harness, sources = FUZZ / f"fuzz_{target}.c", sorted(FASTPATH.glob("*.c"))
    deps = [harness, *sources, *FASTPATH.glob("*.h"), FUZZ / "check.h"]
    if out.exists() and all(out.stat().st_mtime >= d.stat().st_mtime for d in deps):
        return out
    where.mkdir(parents=True, exist_ok=True)
    cc, include = compiler(), f"-I{FASTPATH}"
    own = f"-I{FUZZ}"
    objects = [where / f"{target}-harness.o"]
    _cc([cc, *CFLAGS, SANITIZE, include, own, "-c", str(harness), "-o", str(objects[0])], target)
    for source in sources:
        objects.append(where / f"{target}-{source.stem}.o")
        _cc([cc, *CFLAGS, SANITIZE_COVERAGE, include, "-c", str(source), "-o", str(objects[-1])], target)
    _cc([cc, LINK, *map(str, objects), *LDFLAGS[target], "-o", str(out)], target)
    return out


def run(target: str, seconds: float, runs: int = -1, where: Path = BUILD) -> Result:
    """Run one target on one job for ``seconds`` (or ``runs`` inputs, whichever ends first).

    ``where`` holds the binary, the working corpus, the log and any crash input.
    """
    where = where.resolve()  # libFuzzer runs with where as its cwd
    binary = build(target, where)
    work = where / f"corpus-{target}"
    work.mkdir(parents=True, exist_ok=True)
    prefix = where / f"crash-{target}-"
    argv = [
        str(binary),
        f"-max_total_time={max(1, int(seconds))}",
        f"-runs={runs}",
        f"-max_len={MAX_LEN[target]}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={prefix}",
        str(work),
        str(FUZZ / "corpus" / target),
    ]
    started = time.monotonic()
    # One process, one job: the machine is shared; -fork/-jobs would take every core.
    done = subprocess.run(argv, capture_output=True, text=True, cwd=where, timeout=seconds + 300)
    elapsed = time.monotonic() - started
    log = done.stderr
    (where / f"{target}.log").write_text(log)
    executed = [int(n) for n in re.findall(r"stat::number_of_executed_units: (\d+)", log)]
    cov = [int(n) for n in re.findall(r"\bcov: (\d+)", log)]
    crash = re.search(r"Test unit written to (\S+)", log)
    findings = int(done.returncode != 0 or crash is not None)
    inputs = executed[-1] if executed else 0
    return Result(
        target=target,
        inputs=inputs,
        seconds=round(elapsed, 1),
        inputs_per_second=round(inputs / elapsed, 1) if elapsed else 0.0,
        coverage=max(cov, default=0),
        findings=findings,
        crash=crash.group(1) if crash else None,
    )


def table(results: list[Result]) -> str:
    rows = [("target", "inputs", "seconds", "inputs/s", "coverage", "findings")]
    rows += [
        (
            r.target,
            f"{r.inputs:,}",
            f"{r.seconds:.0f}",
            f"{r.inputs_per_second:,.0f}",
            str(r.coverage),
            str(r.findings),
        )
        for r in results
    ]
    rows.append(
        (
            "total",
            f"{sum(r.inputs for r in results):,}",
            f"{sum(r.seconds for r in results):.0f}",
            "",
            "",
            str(sum(r.findings for r in results)),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument(
        "--runs", type=int, default=-1, help="stop a target after this many inputs (default: no limit)"
    )
    ap.add_argument(
        "--build", type=Path, default=BUILD, help="where binaries, working corpora and crashes go"
    )
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON goes here ('': none)")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or args.seconds <= 0:
        print(f"fuzz: bad --targets {','.join(unknown)!r} or --seconds {args.seconds}", file=sys.stderr)
        return 2
    try:
        results = [run(t, args.seconds, args.runs, args.build) for t in targets]
    except BuildError as e:
        print(f"fuzz: {e}", file=sys.stderr)
        return 2
    print(table(results))
    for r in results:
        if r.crash:
            print(f"{r.target}: finding written to {r.crash}; log in {args.build / (r.target + '.log')}")
    if args.out:
        args.out = Path(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = args.out / f"fuzz-{stamp}.json"
        path.write_text(json.dumps({"when": stamp, "results": [asdict(r) for r in results]}, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
