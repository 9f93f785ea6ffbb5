"""Backends stage, top floor: the backends by name, each imported on first use.

Reading commands (validate, explain, render) never import bcc or pyroute2:
only asking for a backend here does. The imports are plain statements inside
`get`, so the import graph (tests/unit/test_architecture.py) sees them.
"""

from __future__ import annotations

from ..errors import IsoebpfError
from .interface import Backend

BACKENDS = ("ebpf", "iptables")


def get(name: str) -> Backend:
    """The backend called `name`."""
    if name == "ebpf":
        from .ebpf import backend as ebpf

        return ebpf
    if name == "iptables":
        from .iptables import backend as iptables

        return iptables
    raise IsoebpfError(f"unknown backend '{name}' (known: {', '.join(BACKENDS)})")
