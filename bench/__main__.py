"""`python -m bench [--quick] [--only b1,b6,traffic,b7]`: run the suite, write
bench/results/<time>.json, bench/RESULTS.md and bench/plots/*.png. A quick run
writes the same under bench/quick/ (not kept in git), so that it never
replaces the full run's report.

The suite cleans up after itself (namespaces, programs, rules) on failure,
Ctrl-C and SIGTERM alike; `--report FILE` only regenerates the report.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import classifier, cluster, control_plane, machine, policies, report, traffic
from bench.targets import evaluate

HERE = Path(__file__).resolve().parent

PLANS = {
    # rounds, B1 sizes, B6 sizes (isoebpf), B6 peers' sizes, traffic sizes, traffic window (s)
    "full": (3, [10, 1000, 10000, 100000, 1000000], [10, 100, 1000, 10000, 100000, 1000000],
             [1000, 10000, 100000, 1000000], [10, 100, 1000, 10000], 3.0),
    "quick": (1, [10, 10000], [10, 1000, 10000], [1000, 10000], [10, 1000], 1.5),
}


MAIN_PID = os.getpid()


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds the suite like Ctrl-C, so every clean-up runs. Helper
    processes forked from here (pyroute2's netns helper) just die, as they would."""
    if os.getpid() != MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer sizes and runs")
    parser.add_argument("--only", default="b1,b6,traffic",
                        help="comma-separated: b1, b6, traffic, b7 (cluster mode: not in the default, "
                             "it adds about five minutes)")
    parser.add_argument("--policy-format", choices=policies.FORMATS, default=control_plane.POLICY_FORMAT,
                        help="B6's policy files: .yaml, or the same policy as .json (default %(default)s)")
    parser.add_argument("--report", type=Path, help="regenerate RESULTS.md and plots from this JSON, run nothing")
    parser.add_argument("--into", type=Path, help="measure --only's families again into this JSON (the rest is "
                        "kept; the report says which were re-measured, when)")
    args = parser.parse_args(argv)
    if args.report:
        saved: dict[str, Any] = json.loads(args.report.read_text(encoding="utf-8"))
        home = _home(saved["quick"])
        report.write(saved, home / "RESULTS.md", home / "plots")
        return _verdict(saved)
    signal.signal(signal.SIGTERM, _stop)
    rounds, b1_sizes, b6_sizes, peer_sizes, traffic_sizes, window = PLANS["quick" if args.quick else "full"]
    only = set(args.only.split(","))
    started = time.monotonic()
    if args.into:
        results: dict[str, Any] = json.loads(args.into.read_text(encoding="utf-8"))
        results.setdefault("remeasured", {}).update(
            {family: time.strftime("%Y-%m-%d %H:%M:%S %Z") for family in only})
        results.setdefault("remeasured_load", {}).update(
            {family: [round(x, 2) for x in os.getloadavg()[:2]] for family in only})
        # A tool the run before did not have (a new peer) is named with the version measured.
        for tool, version in machine.describe()["versions"].items():
            results["machine"]["versions"].setdefault(tool, version)
    else:
        results = {"command": "make bench-quick" if args.quick else "make bench", "quick": args.quick,
                   "rounds": rounds, "machine": machine.describe()}
    say(f"machine: {results['machine']['cpu']}, kernel {results['machine']['kernel']}")
    if "b1" in only:
        results["b1"] = classifier.run(b1_sizes, rounds, say)
    if "b6" in only:
        results.update(control_plane.run(b6_sizes, peer_sizes, rounds, say, args.policy_format))
    if "traffic" in only:
        results["traffic"] = traffic.run_all(traffic_sizes, rounds, window, say)
    if "b7" in only:
        results["b7"] = cluster.run(cluster.PLANS["quick" if args.quick else "full"], say)
    if not args.into:
        results["duration_s"] = time.monotonic() - started
    home = _home(results["quick"])
    out = home / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report.write(results, home / "RESULTS.md", home / "plots")
    say(f"wrote {out.relative_to(HERE.parent)}, {(home / 'RESULTS.md').relative_to(HERE.parent)}, "
        f"{(home / 'plots').relative_to(HERE.parent)}/")
    return _verdict(results)


def _home(quick: bool) -> Path:
    return HERE / "quick" if quick else HERE


def _verdict(results: dict[str, Any]) -> int:
    for t in evaluate(results):
        state = "not measured" if t.met is None else ("met" if t.met else "MISSED")
        print(f"  {state:12} {t.name}: {t.value} (target {t.bound})")
    # The suite's exit status says it ran; missed targets are results, reported above.
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
