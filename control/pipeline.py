"""The pipeline's entry point: a policy file read, checked, compiled and linted, in one call.

    file --policy.trust--> bytes --policy.parse/jsonfile--> Policy --ir.compiler--> IR --ir.lint--> warnings

Every command and service that starts from a policy file comes through here
(the CLI, the agent, the importer's check, the demo, the bench); the backends
take the IR it returns and never see the file. It imports the policy and IR
stages only.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import Diagnostic, PolicyError, UntrustedPolicyError
from .ir.compiler import Compiler, Delta, Numbering
from .ir.lint import lint
from .ir.tables import IR
from .policy import jsonfile, parse, trust
from .policy.check import Networks
from .policy.model import Policy

# Phases of a long load, for the CLI to show on a terminal (the "isoebpf" logger's INFO).
_progress = logging.getLogger(__name__)


@dataclass(frozen=True)
class Compiled:
    """A valid policy and what it compiles to."""

    compiler: Compiler  # what compiles the next version of the policy as a difference
    warnings: tuple[Diagnostic, ...]  # the file's own and the compiled form's, in file order
    untrusted: str | None = None  # why the file could not be trusted, where --force used it anyway
    # Compiled as a difference of a previous policy: the entries that changed (None:
    # compiled afresh, see Compiler.update).
    delta: Delta | None = None

    @property
    def policy(self) -> Policy:
        return self.compiler.policy

    @property
    def ir(self) -> IR:
        return self.compiler.ir


def read(path: str | Path, data: bytes | None = None, *, check_trust: bool = False,
         force: bool = False, numbering: Numbering | None = None,
         previous: Compiled | None = None, networks: Networks | None = None,
         audit: bool = False) -> Compiled:
    """Read, validate, compile and lint the policy file at `path`; raise PolicyError with
    every error found. `data`: the file's bytes, where the caller has read them already.

    `check_trust` (load, agent: what enforces the file) refuses a file others could
    change with UntrustedPolicyError, unless `force`; reading commands skip it.
    `numbering`: the policy in force's, kept for what stays (an update then writes
    only what changed). `previous`: the compiled policy in force, which the file is
    compiled as a difference of, and which it changes (the agent keeps one); its
    `delta` says what changed. `networks`: the subnets of Docker networks overlays name
    (policy.check.Networks). `audit`: audit mode whatever the file says (`load --audit`)."""
    path = str(path)
    problem = check_trusted(path, force) if check_trust else None
    _progress.info("reading and checking %s", path)
    try:
        text = (Path(path).read_bytes() if data is None else data).decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError([Diagnostic(path, 1, 1, "error", f"cannot read policy: {err}")]) from err
    if previous is None:
        compiled = loads(text, path, numbering, networks, audit)
        return Compiled(compiled.compiler, compiled.warnings, problem)
    with collector_paused():
        policy = parse_policy(text, path, networks, audit)
        _progress.info("compiling %d rules as a change of the policy in force", len(policy.rules))
        delta = previous.compiler.update(policy)
        return Compiled(previous.compiler, _warnings(previous.compiler), problem, delta)


def check_trusted(path: str | Path, force: bool) -> str | None:
    """Refuse a policy file others could change (UntrustedPolicyError), unless `force`:
    then why it is not to be trusted, for a warning (None: it is)."""
    problem = trust.untrusted(path)
    if problem and not force:
        raise UntrustedPolicyError(trust.refusal(path, problem))
    return problem


def loads(text: str, path: str = "<policy>", numbering: Numbering | None = None,
          networks: Networks | None = None, audit: bool = False) -> Compiled:
    """Validate, compile and lint policy text; `path` only names the file in messages."""
    with collector_paused():
        policy = parse_policy(text, path, networks, audit)
        _progress.info("compiling %d rules, %d exceptions, %d overlays", len(policy.rules),
                       len(policy.exceptions), len(policy.overlays))
        compiler = Compiler(policy, numbering)
        return Compiled(compiler, _warnings(compiler))


def parse_policy(text: str, path: str = "<policy>", networks: Networks | None = None,
                 audit: bool = False) -> Policy:
    """The validated model of policy text: JSON or YAML, by the file's name or its first
    character (policy.jsonfile.is_json); raise PolicyError with every error found.
    `audit`: in audit mode whatever the text says."""
    policy = (jsonfile.loads if jsonfile.is_json(text, path) else parse.loads)(text, path, networks)
    return dataclasses.replace(policy, audit=True) if audit and not policy.audit else policy


def _warnings(compiler: Compiler) -> tuple[Diagnostic, ...]:
    return tuple(sorted(compiler.policy.warnings + tuple(lint(compiler.policy, compiler.ir))))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a large policy allocates millions of
    objects (YAML nodes, marks, the model, the IR) that all stay alive, and the
    collections they trigger walked them again and again (100k rules: 16 s of CPU
    with the collector, 4.5 s without). Loading makes no reference cycles to free;
    `isoebpf load` keeps it paused while it writes the maps too.

    What was made meanwhile is frozen out of the collector's sight before it
    resumes: otherwise its first collection walks all of it at once (1.7 s)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


