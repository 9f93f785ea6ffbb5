"""IR stage: the warnings that need the compiled form, such as rules that never decide a packet.

Reads the policy model and the IR the compiler made of it; `isoebpf.pipeline`
joins these warnings to the file's own.
"""

from __future__ import annotations

from ..errors import Diagnostic
from ..policy.model import Policy
from .tables import IR


def lint(policy: Policy, ir: IR) -> list[Diagnostic]:
    """Warnings that need the compiled form: rules that can never decide a packet."""
    effective = {entry.rule for entry in ir.allowed}
    names = {r.name: r.id for r in ir.rules}
    found: list[Diagnostic] = []
    for rule in policy.rules:
        where = (policy.path, rule.where.line, rule.where.column, "warning")
        if names[f"allow:{rule.index}"] not in effective:
            found.append(Diagnostic(*where, f"allow[{rule.index}] never decides a packet: "
                                    "earlier rules, hairpins or exceptions cover all it allows"))
        elif policy.default == "allow":
            found.append(Diagnostic(*where, f"allow[{rule.index}] has no effect under "
                                    "'default: allow' (it only names the traffic in counters)"))
    return found

