"""The issue's targets, judged from a results document (pure functions of the JSON)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

AUTO = "ebpf-tc"  # what `--mode auto` attaches on the router's veths


@dataclass(frozen=True)
class Target:
    name: str
    bound: str
    value: str
    met: bool | None  # None: not measured in this run


def _median(row: dict[str, Any] | None, key: str) -> float | None:
    return None if row is None else float(row[key]["median"])


def _row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def classifier_scaling(results: dict[str, Any]) -> Target:
    rows = results.get("b1", [])
    sizes = sorted({r["rules"] for r in rows})
    name = "B1: cost per path at the most rules <= 2 x at 10 rules"
    if len(sizes) < 2:
        return Target(name, "<= 2.0", "not measured", None)
    low, high = sizes[0], sizes[-1]
    worst, where = 0.0, ""
    for r in rows:
        if r["rules"] != high:
            continue
        base = _median(_row(rows, rules=low, prog=r["prog"], path=r["path"]), "ns")
        if base:
            factor = float(r["ns"]["median"]) / base
            if factor > worst:
                worst, where = factor, f"{r['prog']} {r['path']}"
    return Target(name, "<= 2.0", f"worst {worst:.2f} x ({where}, {high} vs {low} rules)", worst <= 2.0)


def traffic_row(results: dict[str, Any], enforcer: str, measure: str,
                rules: int | None = None) -> dict[str, Any] | None:
    """The row of one enforcer and measure, at `rules` (the fewest measured by default)."""
    rows = results.get("traffic", [])
    if rules is None and rows:
        rules = min(r["rules"] for r in rows)
    return _row(rows, rules=rules, enforcer=enforcer, measure=measure)


def _at_least(name: str, bound: str, ratio: float, ours: float | None, base: float | None,
              says: Callable[[float, float], str]) -> Target:
    """Met when `ours` >= `ratio` x `base`; not measured when either is missing."""
    if not (ours and base):
        return Target(name, bound, "not measured", None)
    return Target(name, bound, says(ours, base), ours >= ratio * base)


def discard(results: dict[str, Any]) -> list[Target]:
    """Our XDP program discarding (deny_action: drop) against the bare XDP_DROP and
    against the iptables fallback as documented (REJECT)."""
    ours = _median(traffic_row(results, "ebpf-xdp-drop", "denied"), "processed_pps")
    ceiling = _median(traffic_row(results, "xdp-drop", "denied"), "processed_pps")
    ipt = _median(traffic_row(results, "iptables", "denied"), "processed_pps")
    return [
        _at_least("B2: XDP discard (drop) >= 95 % of bare XDP_DROP", ">= 0.95", 0.95, ours, ceiling,
                  lambda o, b: f"{o / b:.2f} ({o:,.0f} vs {b:,.0f} pps)"),
        _at_least("B2: XDP discard (drop) >= 3 x iptables REJECT", ">= 3.0", 3, ours, ipt,
                  lambda o, b: f"{o / b:.2f} x ({o:,.0f} vs {b:,.0f} pps)"),
    ]


def answers(results: dict[str, Any]) -> Target:
    return _at_least("B2: REJECT answers by the program (auto mode) >= 3 x iptables REJECT", ">= 3.0", 3,
                     _median(traffic_row(results, AUTO, "denied"), "answers_pps"),
                     _median(traffic_row(results, "iptables", "denied"), "answers_pps"),
                     lambda o, b: f"{o / b:.2f} x ({o:,.0f} vs {b:,.0f} answers/s)")


def throughput(results: dict[str, Any]) -> Target:
    return _at_least("B3: allowed TCP through eBPF (auto mode) >= 95 % of no filter", ">= 0.95", 0.95,
                     _median(traffic_row(results, AUTO, "tcp"), "gbit_s"),
                     _median(traffic_row(results, "none", "tcp"), "gbit_s"),
                     lambda o, b: f"{o / b:.2f} ({o:.2f} vs {b:.2f} Gbit/s)")


def scaling(results: dict[str, Any]) -> list[Target]:
    sizes = sorted({r["rules"] for r in results.get("traffic", [])})
    at_low = at_high = ipt = None  # fewer than two sizes: nothing to compare
    low, high = (sizes[0], sizes[-1]) if sizes else (0, 0)
    if len(sizes) >= 2:
        at_low = _median(traffic_row(results, AUTO, "denied", low), "processed_pps")
        at_high = _median(traffic_row(results, AUTO, "denied", high), "processed_pps")
        ipt = _median(traffic_row(results, "iptables", "denied", high), "processed_pps")
    return [
        _at_least("B4: eBPF (auto) discard at the most rules >= 90 % of 10 rules", ">= 0.90", 0.9,
                  at_high, at_low,
                  lambda o, b: f"{o / b:.2f} ({o:,.0f} at {high} vs {b:,.0f} at {low} rules)"),
        _at_least("B4: eBPF (auto) discard at the most rules >= 50 x iptables plain rules", ">= 50", 50,
                  at_high, ipt, lambda o, b: f"{o / b:.1f} x ({o:,.0f} vs {b:,.0f} pps at {high} rules)"),
    ]


def control_plane(results: dict[str, Any]) -> list[Target]:
    rows = results.get("b6", [])
    top = max(rows, key=lambda r: r["rules"]) if rows else None
    if top is None:
        return [Target("B6: loading 100k rules <= 3 s including compile", "<= 3 s", "not measured", None),
                Target("B6: a one-rule change <= 100 ms, no recompile", "<= 100 ms", "not measured", None)]
    phases = float(top["load_total_s"]["median"])
    change = float(top["change_apply_s"]["median"])
    rules = top["rules"]
    if "cli_load_s" in top:  # results from before the bench timed `isoebpf load` have only phases
        load = float(top["cli_load_s"]["median"])
        said = f"{load:.2f} s (`isoebpf load`; its phases add up to {phases:.2f} s)"
        change_said = (f"{change * 1000:.0f} ms (map writes; the program is not recompiled; `isoebpf load` "
                       f"of the change: {float(top['cli_change_s']['median']):.2f} s)")
    else:
        load, said = phases, f"{phases:.2f} s (phases added up)"
        change_said = f"{change * 1000:.0f} ms (map writes; the program is not recompiled)"
    return [
        Target(f"B6: loading {rules} rules <= 3 s including compile", "<= 3 s", said, load <= 3.0),
        Target(f"B6: a one-rule change at {rules} rules <= 100 ms, no recompile", "<= 100 ms",
               change_said, change <= 0.1),
    ]


def evaluate(results: dict[str, Any]) -> list[Target]:
    return [classifier_scaling(results), *discard(results), answers(results), throughput(results),
            *scaling(results), *control_plane(results)]
