"""The issue's targets, judged from a results document (pure functions of the JSON)."""

from __future__ import annotations

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


def _traffic(results: dict[str, Any], enforcer: str, measure: str, rules: int | None = None) -> dict[str, Any] | None:
    rows = results.get("traffic", [])
    if rules is None and rows:
        rules = min(r["rules"] for r in rows)
    return _row(rows, rules=rules, enforcer=enforcer, measure=measure)


def discard(results: dict[str, Any]) -> list[Target]:
    """Our XDP program discarding (deny_action: drop) against the bare XDP_DROP and
    against the iptables fallback as documented (REJECT)."""
    ours = _median(_traffic(results, "ebpf-xdp-drop", "denied"), "processed_pps")
    ceiling = _median(_traffic(results, "xdp-drop", "denied"), "processed_pps")
    ipt = _median(_traffic(results, "iptables", "denied"), "processed_pps")
    first = Target("B2: XDP discard (drop) >= 95 % of bare XDP_DROP", ">= 0.95",
                   "not measured" if not (ours and ceiling) else
                   f"{ours / ceiling:.2f} ({ours:,.0f} vs {ceiling:,.0f} pps)",
                   None if not (ours and ceiling) else ours >= 0.95 * ceiling)
    second = Target("B2: XDP discard (drop) >= 3 x iptables REJECT", ">= 3.0",
                    "not measured" if not (ours and ipt) else f"{ours / ipt:.2f} x ({ours:,.0f} vs {ipt:,.0f} pps)",
                    None if not (ours and ipt) else ours >= 3 * ipt)
    return [first, second]


def answers(results: dict[str, Any]) -> Target:
    ours = _median(_traffic(results, AUTO, "denied"), "answers_pps")
    ipt = _median(_traffic(results, "iptables", "denied"), "answers_pps")
    name = "B2: REJECT answers by the program (auto mode) >= 3 x iptables REJECT"
    if not (ours and ipt):
        return Target(name, ">= 3.0", "not measured", None)
    return Target(name, ">= 3.0", f"{ours / ipt:.2f} x ({ours:,.0f} vs {ipt:,.0f} answers/s)", ours >= 3 * ipt)


def throughput(results: dict[str, Any]) -> Target:
    ours = _median(_traffic(results, AUTO, "tcp"), "gbit_s")
    none = _median(_traffic(results, "none", "tcp"), "gbit_s")
    name = "B3: allowed TCP through eBPF (auto mode) >= 95 % of no filter"
    if not (ours and none):
        return Target(name, ">= 0.95", "not measured", None)
    return Target(name, ">= 0.95", f"{ours / none:.2f} ({ours:.2f} vs {none:.2f} Gbit/s)", ours >= 0.95 * none)


def scaling(results: dict[str, Any]) -> list[Target]:
    rows = results.get("traffic", [])
    sizes = sorted({r["rules"] for r in rows})
    names = ("B4: eBPF (auto) discard at the most rules >= 90 % of 10 rules",
             "B4: eBPF (auto) discard at the most rules >= 50 x iptables plain rules")
    if len(sizes) < 2:
        return [Target(n, b, "not measured", None) for n, b in zip(names, (">= 0.90", ">= 50"), strict=True)]
    low, high = sizes[0], sizes[-1]
    at_low = _median(_traffic(results, AUTO, "denied", low), "processed_pps")
    at_high = _median(_traffic(results, AUTO, "denied", high), "processed_pps")
    ipt = _median(_traffic(results, "iptables", "denied", high), "processed_pps")
    first = Target(names[0], ">= 0.90",
                   f"{at_high / at_low:.2f} ({at_high:,.0f} at {high} vs {at_low:,.0f} at {low} rules)"
                   if at_low and at_high else "not measured",
                   at_high >= 0.9 * at_low if at_low and at_high else None)
    second = Target(names[1], ">= 50",
                    f"{at_high / ipt:.1f} x ({at_high:,.0f} vs {ipt:,.0f} pps at {high} rules)"
                    if at_high and ipt else "not measured",
                    at_high >= 50 * ipt if at_high and ipt else None)
    return [first, second]


def control_plane(results: dict[str, Any]) -> list[Target]:
    rows = results.get("b6", [])
    top = max(rows, key=lambda r: r["rules"]) if rows else None
    if top is None:
        return [Target("B6: loading 100k rules <= 3 s including compile", "<= 3 s", "not measured", None),
                Target("B6: a one-rule change <= 100 ms, no recompile", "<= 100 ms", "not measured", None)]
    load = float(top["load_total_s"]["median"])
    change = float(top["change_apply_s"]["median"])
    rules = top["rules"]
    return [
        Target(f"B6: loading {rules} rules <= 3 s including compile", "<= 3 s", f"{load:.2f} s", load <= 3.0),
        Target(f"B6: a one-rule change at {rules} rules <= 100 ms, no recompile", "<= 100 ms",
               f"{change * 1000:.0f} ms (map writes; the program is not recompiled)", change <= 0.1),
    ]


def evaluate(results: dict[str, Any]) -> list[Target]:
    return [classifier_scaling(results), *discard(results), answers(results), throughput(results),
            *scaling(results), *control_plane(results)]
