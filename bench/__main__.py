"""``python -m bench``: measure every variant, print the table, save JSON and PNG under bench/results/.

``make bench`` (3 rounds, about 16 minutes on 2 CPUs) also rewrites bench/RESULTS.md;
``make bench-quick`` is one round of shorter tests (about 4 minutes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from . import chart, report
from .plan import BY_NAME, DEFAULT_VARIANTS, TESTS

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"

FULL = {"rounds": 3, "seconds": 5, "ping_count": 20}
QUICK = {"rounds": 1, "seconds": 3, "ping_count": 10}


def _names(text: str, known: tuple[str, ...] | list[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown)!r}; choose from {', '.join(known)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of shorter tests (about 2 minutes)")
    p.add_argument(
        "--variants",
        type=lambda t: _names(t, list(BY_NAME), "variant"),
        help=f"comma-separated, from {','.join(BY_NAME)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--tests", type=lambda t: _names(t, TESTS, "test"), help=f"subset of {','.join(TESTS)}")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    p.add_argument(
        "--seconds",
        type=int,
        help="iperf3 seconds per TCP test (default 5, quick 3); UDP and rr run one less",
    )
    p.add_argument("--ping-count", type=int, help="pings per round (default 20, quick 10), 50 ms apart")
    p.add_argument("--out", type=Path, help=f"where the JSON and PNG go (default {RESULTS_DIR})")
    p.add_argument("--report", type=Path, metavar="JSON", help="re-render a saved result: table and PNG")
    p.add_argument("--markdown", type=Path, metavar="MD", help="also write the markdown table here")
    args = p.parse_args(argv)
    for name in ("rounds", "seconds", "ping_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C


def render(result: dict[str, Any], json_path: Path, markdown: Path | None) -> None:
    png = chart.save(result, json_path.with_suffix(".png"))
    print()
    print(report.render_text(result))
    print(f"\nresults: {json_path}\nchart:   {png}")
    if markdown:
        rel = os.path.relpath(png, markdown.parent)
        markdown.write_text(report.render_markdown(result, chart=rel))
        print(f"table:   {markdown}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        render(result, args.report, args.markdown)
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, TUN, VXLAN)", file=sys.stderr)
        return 2
    tests = args.tests or TESTS
    for tool in ("iperf3", "ping", "ip", "ss", *(("sockperf",) if "rr" in tests else ())):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (make setup)", file=sys.stderr)
            return 2

    from .harness import Config, run_bench

    base = QUICK if args.quick else FULL
    seconds = args.seconds or base["seconds"]
    config = Config(
        variants=args.variants or DEFAULT_VARIANTS,
        rounds=args.rounds or base["rounds"],
        seconds=seconds,
        udp_seconds=max(1, seconds - 1),
        ping_count=args.ping_count or base["ping_count"],
        tests=tests,
        quick=args.quick,
    )
    # `make bench` as is (no overrides) refreshes the committed table.
    default_run = not args.quick and not any((args.variants, args.tests, args.rounds, args.seconds, args.out))
    markdown = args.markdown or (RESULTS_MD if default_run else None)
    out = args.out or RESULTS_DIR

    signal.signal(signal.SIGTERM, _on_sigterm)
    n = len(config.variants) * config.rounds * len(config.tests)
    print(
        f"bench: {config.rounds} round(s) x {len(config.variants)} variants x {len(config.tests)} tests"
        f" = {n} steps; TCP {config.seconds} s, UDP {config.udp_seconds} s; Ctrl-C stops and cleans up",
        flush=True,
    )
    try:
        result = run_bench(config, say=lambda text, end="\n": print(text, end=end, flush=True))
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process stopped and every namespace deleted", file=sys.stderr)
        return 130

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stamp}.json"
    result["source"] = os.path.relpath(json_path, HERE.parent)
    table = report.summary(result["runs"])
    result["summary"] = {
        v: {k: s.as_dict() if s else None for k, s in row.items()} for v, row in table.items()
    }
    result["ratios"] = report.ratios(table)
    result["targets"] = report.target_results(table)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.rename(json_path)
    render(result, json_path, markdown)
    if result["errors"]:
        print(f"\nbench: {len(result['errors'])} problem(s):", file=sys.stderr)
        for e in result["errors"]:
            print(f"  {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
