"""The one exception hierarchy, below every stage. The CLI turns each into a message and an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class IsoebpfError(Exception):
    """Base of every error isoebpf raises on purpose; its text is for the user."""


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One finding about a policy file, located like a compiler's."""

    file: str
    line: int
    column: int
    severity: str  # "error" or "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"


class PolicyError(IsoebpfError):
    """A policy file failed validation; every error found is in `diagnostics`."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        errors = [d for d in diagnostics if d.severity == "error"]
        super().__init__("\n".join(str(d) for d in errors))


class UntrustedPolicyError(IsoebpfError):
    """`load` or `agent` was given a policy file others could change, without --force."""


class StateError(IsoebpfError):
    """The kernel or the state on disk is not what a command needs."""


class BackendError(IsoebpfError):
    """A backend could not apply, read or remove enforcement."""


class CapacityError(BackendError):
    """A policy needs more entries than the eBPF maps in force hold: an update moves it
    to larger maps."""


class ProgramRejected(BackendError):
    """This kernel's verifier refused the eBPF program: `--backend auto` falls back to iptables."""
