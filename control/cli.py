"""The command line: a thin click layer over the pipeline, the backends' enforcer and the
service stage; the only module that imports click.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TextIO, TypeVar

import click
import netaddr

from . import pipeline
from .backends import enforcer, registry
from .backends.state import Scope, require_privilege
from .errors import Diagnostic, IsoebpfError, PolicyError, StateError
from .ir.compiler import Numbering
from .ir.explain import PortNeededError, Question, explain
from .service import flows as flowlog


class _Group(click.Group):
    """Turns our errors into one clear message and exit 1; --debug adds the traceback.
    Under --json the error is also one JSON object on stdout ({"ok": false, ...}),
    usage errors (exit 2) too."""

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        # Whether --json was asked for, known before the command's options are parsed:
        # an error in parsing them is answered in JSON too.
        if command is not None and any(p.name == "as_json" for p in command.params):
            options = rest[:rest.index("--")] if "--" in rest else rest
            ctx.meta[_JSON_ASKED] = "--json" in options
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolicyError as err:
            count = sum(1 for d in err.diagnostics if d.severity == "error")
            summary = f"{count} error{'s' if count != 1 else ''}; nothing was applied"
            if _json_wanted(ctx):
                _emit({"ok": False, "error": summary, "exit_code": 1,
                       "diagnostics": _diagnostics(err.diagnostics)})
            for diagnostic in err.diagnostics:
                click.echo(str(diagnostic), err=True)
            click.echo(summary, err=True)
            ctx.exit(1)
        except IsoebpfError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            if _json_wanted(ctx):
                extra = {"by_port": err.by_port} if isinstance(err, PortNeededError) else {}
                _emit({"ok": False, "error": str(err), "exit_code": 1, **extra})
            click.echo(f"isoebpf: error: {err}", err=True)
            ctx.exit(1)
        except click.ClickException as err:  # usage errors (2), unreadable files (1): click shows them
            if _json_wanted(ctx):
                _emit({"ok": False, "error": err.format_message(), "exit_code": err.exit_code})
            raise


_JSON_ASKED = "isoebpf.json_asked"
_F = TypeVar("_F", bound=Callable[..., Any])


def _json_wanted(ctx: click.Context) -> bool:
    """--json is among the command's options (seen before they were parsed, so an
    error in parsing them is answered in JSON too)."""
    return bool(ctx.meta.get(_JSON_ASKED))


def json_option(help: str = "Print the result as one line of JSON; an error as "
                            '{"ok": false, "error": ...}.') -> Callable[[_F], _F]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def _emit(document: dict[str, Any]) -> None:
    """One JSON document, on one line of stdout: all that --json prints there."""
    click.echo(json.dumps(document, sort_keys=True, default=str))


def _diagnostics(diagnostics: Iterable[Diagnostic]) -> list[dict[str, Any]]:
    """Diagnostics as JSON objects: file, line, column, severity, message."""
    return [dataclasses.asdict(d) for d in diagnostics]


def _require_namespace(scope: Scope) -> None:
    """Refuse a named network namespace that does not exist, before anything is
    read or written for it (a load would leave a failure record behind)."""
    if not scope.namespace_gone:
        return
    message = f"no network namespace {scope.netns} ('ip netns list' shows those there are)"
    try:
        if scope.holds_state:
            message += (f"; isoebpf still holds state of it (deleted with 'ip netns del'?): "
                        f"'isoebpf unload --netns {scope.netns}' removes it")
    except OSError:
        pass  # not root: cannot look; the message above stands
    raise StateError(message)


# A load that takes longer than this shows its phases on a terminal.
PROGRESS_AFTER = 1.0


class _Progress(logging.Handler):
    """A load's phases (the "isoebpf" logger's INFO records) on stderr, once the load
    has run PROGRESS_AFTER seconds: the phase under way then, and every one after,
    each with the seconds since the start. A quick load says nothing more."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._started = time.monotonic()
        self._phase: str | None = None
        self._showing = PROGRESS_AFTER <= 0
        self._said = threading.Lock()
        self._timer = threading.Timer(PROGRESS_AFTER, self._show)
        self._timer.daemon = True
        self._timer.start()

    def emit(self, record: logging.LogRecord) -> None:
        with self._said:
            self._phase = record.getMessage()
            if self._showing:
                self._say(self._phase)

    def _show(self) -> None:
        with self._said:
            self._showing = True
            if self._phase:
                self._say(self._phase)

    def _say(self, phase: str) -> None:
        click.echo(f"{time.monotonic() - self._started:5.1f} s  {phase}", err=True)

    def close(self) -> None:
        self._timer.cancel()
        super().close()


def _on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def _progress(shown: bool) -> Iterator[None]:
    """Show a long load's phases while it runs (see _Progress), if `shown`."""
    if not shown:
        yield
        return
    handler, logger = _Progress(), logging.getLogger("isoebpf")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


# Options `load` and `agent` share.
force_option = click.option(
    "--force", is_flag=True,
    help="Override safety refusals: a policy file others can write, another tool's XDP program "
         "or TC filter (replaced).")
on_failure_option = click.option(
    "--on-failure", type=click.Choice(enforcer.FAILURE_MODES), default="closed", show_default=True,
    help="When a change cannot be applied: closed keeps the policy in force; open removes all "
         "enforcement.")


@click.group(cls=_Group)
@click.version_option(package_name="isoebpf", prog_name="isoebpf", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """isoebpf: isolation between overlay networks, enforced by eBPF.

    Exit codes: 0 success, 1 failure or invalid policy, 2 usage error. With
    --json a command prints one JSON document on stdout, an error included
    ({"ok": false, "error": ...}); messages for people go to stderr.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _read(path: str, check_trust: bool = False, force: bool = False,
          numbering: Numbering | None = None, audit: bool = False) -> pipeline.Compiled:
    """The policy file through the pipeline, its warnings said on stderr. `check_trust`
    (load, agent): a file others could write is refused unless --force; `numbering`:
    the policy in force's; `audit`: audit mode whatever the file says (pipeline.read)."""
    from .service.docker import Engine  # asked only by a policy that names a Docker network

    compiled = pipeline.read(path, check_trust=check_trust, force=force, numbering=numbering,
                             networks=Engine().subnets, audit=audit)
    if compiled.untrusted:
        click.echo(f"warning: {compiled.untrusted}; used anyway (--force)", err=True)
    for warning in compiled.warnings:
        click.echo(str(warning), err=True)
    return compiled


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@json_option()
def validate(policy_file: str, as_json: bool) -> None:
    """Check POLICY; print a one-line summary or every error."""
    compiled = _read(policy_file)
    policy, ir = compiled.policy, compiled.ir
    if as_json:
        _emit({"ok": True, "file": policy_file, "overlays": len(policy.overlays),
               "exceptions": len(policy.exceptions), "rules": len(policy.rules),
               "default": policy.default, "deny_action": policy.deny_action,
               "address_classes": len(ir.classes), "allow_entries": len(ir.allowed),
               "digest": ir.digest, "warnings": _diagnostics(compiled.warnings)})
        return
    rule_word = "rule" if len(policy.rules) == 1 else "rules"
    default = "allow" if policy.default == "allow" else f"deny ({policy.deny_action})"
    click.echo(
        f"{policy_file}: valid: {len(policy.overlays)} overlays, "
        f"{len(policy.exceptions)} exceptions, {len(policy.rules)} allow {rule_word}, "
        f"default {default}; {len(ir.classes)} address classes, "
        f"{len(ir.allowed)} allow entries; digest {ir.digest[:12]}"
    )


def _address(ctx: click.Context, param: click.Parameter, value: str) -> netaddr.IPAddress:
    try:
        return netaddr.IPAddress(value, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError) as err:
        raise click.BadParameter(f"'{value}' is not an IP address") from err


@main.command(name="explain")
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--src", required=True, callback=_address, help="Source address.")
@click.option("--dst", required=True, callback=_address, help="Destination address.")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]), default="tcp",
              show_default=True)
@click.option("--dport", type=click.IntRange(1, 65535), help="Destination port (tcp, udp).")
@json_option()
def explain_cmd(policy_file: str, src: netaddr.IPAddress, dst: netaddr.IPAddress, proto: str,
                dport: int | None, as_json: bool) -> None:
    """The verdict for the first packet of a new connection, and the rule that decides it."""
    if proto == "icmp" and dport is not None:
        raise click.UsageError("--dport goes with --proto tcp or udp")
    compiled = _read(policy_file)
    answer = explain(compiled.ir, Question(src, dst, proto, dport))
    if as_json:
        _emit({"ok": True, **answer, "warnings": _diagnostics(compiled.warnings)})
        return
    what = proto if dport is None else f"{proto}/{dport}"
    src_where = answer["src_overlay"] or "no overlay"
    dst_where = answer["dst_overlay"] or "no overlay"
    click.echo(f"{src} ({src_where}) -> {dst} ({dst_where}) {what}: {answer['action']}")
    line = f", line {answer['line']}" if answer["line"] else ""
    click.echo(f"  decided by {answer['rule']} ({answer['rule_text']}{line}): {answer['reason']}")


AUDIT_BANNER = ("*** AUDIT MODE: NOTHING IS DENIED. Would-be denials are counted and traced "
                "as their rules; load without --audit (and without 'audit: true') to enforce. ***")

audit_option = click.option(
    "--audit", is_flag=True,
    help="Audit mode: judge, count and trace every packet as the policy says, deny nothing "
         "(as 'audit: true' in the policy). Loading without it (and without the key) enforces; "
         "either switch is one atomic update that keeps connections.")


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--backend", "backend_name", type=click.Choice(["auto", *registry.BACKENDS]),
              default="auto", show_default=True)
@click.option("--mode", type=click.Choice(["auto", "xdp", "tc"]), default="auto", show_default=True,
              help="eBPF attach mode; auto chooses per interface and says why.")
@click.option("--iface", "ifaces", multiple=True, metavar="GLOB",
              help="Interfaces to enforce on (overrides the policy's 'interfaces').")
@click.option("--netns", metavar="NAME", help="Act on this network namespace's interfaces.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@force_option
@on_failure_option
@click.option("--chain", metavar="NAME",
              help="iptables backend: the isolation chain [default: the one in force, "
                   "else dcos-isolation].")
@json_option("Print what was done (with --dry-run: what would be) as one line of JSON.")
@audit_option
@click.option("--quiet", is_flag=True,
              help=f"No progress: a load that runs over {PROGRESS_AFTER:g} s shows its phases "
                   "on a terminal otherwise.")
def load(policy_file: str, backend_name: str, mode: str, ifaces: tuple[str, ...],
         netns: str | None, dry_run: bool, force: bool, on_failure: str,
         chain: str | None, as_json: bool, audit: bool, quiet: bool) -> None:
    """Start enforcing POLICY, or atomically replace the policy enforced."""
    if not dry_run:
        require_privilege("load")
    scope = Scope(netns)
    _require_namespace(scope)
    # bcc moves the whole process into the kernel headers' directory while it compiles.
    policy_file = os.path.abspath(policy_file)
    # A first eBPF load compiles the program (seconds): on another core, meanwhile.
    compiling = None if dry_run else enforcer.compile_early(backend_name, scope, _size_of(policy_file))
    try:
        with pipeline.collector_paused(), _progress(not (quiet or as_json) and _on_terminal()):
            result = _enforce(policy_file, backend_name, mode, ifaces, scope, dry_run, force,
                              on_failure, chain, compiling, as_json, audit)
    except BaseException:
        if compiling is not None and _program_ends_after_command:  # said at once (see run)
            compiling.abandon()
            _abandoned.append(compiling)
        raise
    finally:
        if compiling is not None:
            compiling.discard()  # waits for the compile, unless abandoned
    if as_json:
        _emit({"ok": True, **result})
    else:
        _say_enforced(result)


def _size_of(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None  # reading it says why


def _enforce(policy_file: str, backend_name: str, mode: str, ifaces: tuple[str, ...],
             scope: Scope, dry_run: bool, force: bool, on_failure: str, chain: str | None,
             compiling: Any | None, as_json: bool, audit: bool) -> dict[str, Any]:
    """Load (or, dry run, only choose): the result, for _say_enforced or as JSON. The
    backend and why are said at once (on stderr under --json), before the seconds a
    load may take."""
    compiled = _read(policy_file, check_trust=True, force=force, numbering=enforcer.numbering(scope),
                     audit=audit)
    ir = compiled.ir
    globs = list(ifaces) or list(ir.interfaces or ())
    chosen, why = enforcer.choose(backend_name, scope, compiling)
    click.echo(f"backend {chosen}: {why}", err=as_json)
    if chain and chosen != "iptables":
        raise click.UsageError(f"--chain names the iptables backend's chain, not {chosen}'s")
    result: dict[str, Any] = {"policy": policy_file, "digest": ir.digest, "audit": ir.audit, "netns": scope.netns,
                              "interfaces": globs, "dry_run": dry_run, "why": why,
                              "warnings": _diagnostics(compiled.warnings)}
    extra = {"chain": chain} if chain else {}
    if dry_run:
        try:
            plan = enforcer.plan(chosen, scope, ir, **extra)
        except (IsoebpfError, OSError) as err:  # not root: neither pins nor rules can be read
            plan = [f"unknown: {err}"]
        return {**result, "backend": chosen, "switch_from": enforcer.switch_from(scope, chosen),
                "plan": plan}
    chosen, report, notes = enforcer.load(backend_name, chosen, ir, scope, globs, mode, policy_file,
                                         force=force, on_failure=on_failure, compiling=compiling,
                                        **extra)
    # Every field of the report, whatever it holds: attachments become objects, and
    # what the user should act on joins the policy's warnings.
    fields = dataclasses.asdict(report)
    cautions = [{"severity": "warning", "message": w} for w in fields.pop("warnings")]
    return {**fields, **result, "backend": chosen, "notes": notes,
            "warnings": [*result["warnings"], *cautions]}


def _say_enforced(result: dict[str, Any]) -> None:
    """load's result (_enforce's), as text."""
    netns = result["netns"]
    where = f"namespace {netns}" if netns else "this namespace"
    what = f"{result['policy']} (digest {result['digest'][:12]}) with {result['backend']} in {where}"
    if result["dry_run"]:
        previous = result["switch_from"]
        if previous:
            click.echo(f"would switch from {previous} to {result['backend']}: {result['backend']} "
                       f"is loaded and verified first, then {previous}'s enforcement is removed")
        click.echo(f"would enforce {what} on interfaces matching "
                   f"{', '.join(result['interfaces']) or '(none given)'}; nothing changed")
        click.echo("loading would change:")
        for line in result["plan"]:
            click.echo(f"  {line}")
        return
    for note in result["notes"]:
        click.echo(note)
    if result["replaced_layout"]:
        click.echo(f"removed older state ({result['replaced_layout']}) instead of reusing it")
    if result["audit"]:
        click.echo(AUDIT_BANNER)
    click.echo(f"{'auditing' if result['audit'] else 'enforcing'} {what}, generation {result['generation']}")
    if result["grown"]:
        click.echo("the policy did not fit beside the one in force: moved to new maps "
                   f"({result['grown']}), connections kept")
    if result["compiled"]:
        click.echo(f"compiled the program in {result['compile_seconds']:.2f} s")
    click.echo(f"applied in {result['apply_seconds'] * 1000:.0f} ms")
    for a in result["attachments"]:
        click.echo(f"  {a['ifname']:15} {a['mode']:10} {a['reason']}")
    for detached in result["detached"]:
        click.echo(f"detached from {detached}")
    for warning in result["warnings"]:
        if "file" not in warning:  # the policy's own warnings were said as it loaded
            click.echo(f"warning: {warning['message']}", err=True)


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--backend", "backend_name", type=click.Choice(["iptables"]), default="iptables",
              show_default=True, help="The backend whose input to print.")
@click.option("--chain", default="dcos-isolation", show_default=True,
              help="The isolation chain's name.")
@click.option("--layout", "layout_kind", type=click.Choice(["auto", "full", "degraded"]),
              default="auto", show_default=True,
              help="auto: the layout this kernel's ipset types allow (asks the kernel, as root).")
def render(policy_file: str, backend_name: str, chain: str, layout_kind: str) -> None:
    """Print the ipset and iptables-restore input that loading POLICY would apply."""
    from .backends.iptables import layout as iptables_layout

    ir = _read(policy_file).ir
    if layout_kind == "auto":
        from .backends.iptables import backend as iptables

        found, hidden = iptables.set_types()
    else:
        found, hidden = (iptables_layout.SET_TYPES if layout_kind == "full"
                         else (iptables_layout.NET,)), ()
    ipset_text, v4, v6 = iptables_layout.render(ir, chain, found)
    kind = iptables_layout.layout_kind(found)
    missing = [t for t in iptables_layout.SET_TYPES if t not in found]
    why = (f": {'hidden' if hidden else 'this kernel has no'} {', '.join(missing)}"
           if layout_kind == "auto" and missing else "")
    click.echo(f"# {kind} layout{why}")
    for header, text in (("ipset restore", ipset_text), ("iptables-restore --noflush", v4),
                         ("ip6tables-restore --noflush", v6)):
        click.echo(f"# {header}")
        click.echo(text, nl=False)


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--node", is_flag=True,
              help="Edges carry this node's counts: the packets each rule of the policy loaded "
                   "here decided (matched to POLICY's rules by identity).")
@click.option("--netns", metavar="NAME", help="With --node: the namespace whose enforcement to read.")
@click.option("--format", "form", type=click.Choice(["dot", "svg", "png"]), default="dot",
              show_default=True, help="svg and png are drawn by Graphviz's dot.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here, not to stdout.")
def graph(policy_file: str, node: bool, netns: str | None, form: str, output: str | None) -> None:
    """Draw POLICY: overlays as nodes, allow rules as edges labelled with their ports,
    exceptions dashed, isolated overlays with a double border, the default below."""
    from .ir.graph import dot, picture

    if netns and not node:
        raise click.UsageError("--netns goes with --node")
    compiled = _read(policy_file)
    packets, record = None, None
    if node:
        scope = Scope(netns)
        _require_namespace(scope)
        record = enforcer.status(scope)
        if record is None or record.get("backend") is None:
            raise IsoebpfError("nothing loaded" + (f" in namespace {netns}" if netns else "")
                               + ": --node draws the counts of the policy in force")
        if record["digest"] != compiled.ir.digest:
            click.echo(f"warning: {record['policy']} is in force, not {policy_file}: its counts "
                       "are shown on the rules they share", err=True)
        packets = {c["identity"]: c["packets"] for c in record.get("counters", [])}
    text = dot(picture(compiled.policy, compiled.ir, packets, audit=bool(record and record.get("audit"))))
    drawn = text.encode() if form == "dot" else _drawn(text, form)
    if output:
        with open(output, "wb") as out:
            out.write(drawn)
    else:
        click.echo(drawn, nl=False)


def _drawn(text: str, form: str) -> bytes:
    """DOT text drawn by Graphviz's `dot` as `form` (svg, png)."""
    try:
        done = subprocess.run(["dot", f"-T{form}"], input=text.encode(), capture_output=True)
    except FileNotFoundError as err:
        raise IsoebpfError("Graphviz's dot is not installed (Debian: apt install graphviz); "
                           "--format dot needs nothing") from err
    if done.returncode != 0:
        raise IsoebpfError(f"dot could not draw the graph: {done.stderr.decode().strip()}")
    return done.stdout


@main.command(name="import")
@click.option("--iptables-save", "v4_file", type=click.File("r", encoding="utf-8"),
              help="iptables-save output (or an iptables-restore file).")
@click.option("--ip6tables-save", "v6_file", type=click.File("r", encoding="utf-8"),
              help="ip6tables-save output, for a layout with IPv6 overlays.")
@click.option("--ipset-save", "set_file", required=True, type=click.File("r", encoding="utf-8"),
              help="ipset save output (or an ipset restore file).")
def import_cmd(v4_file: TextIO | None, v6_file: TextIO | None, set_file: TextIO) -> None:
    """Turn a hand-built DC/OS-style layout into a policy file, printed on stdout.

    Warnings (stderr) say where the layout does something else today: rules
    after a terminal REJECT, an empty or incomplete overlays set, malformed entries.
    """
    from .backends.iptables.importer import import_layout

    rule_files = [(f.name, version, f.read()) for f, version in ((v4_file, 4), (v6_file, 6)) if f]
    if not rule_files:
        raise click.UsageError("give --iptables-save FILE, --ip6tables-save FILE or both")
    imported = import_layout(rule_files, (set_file.name, set_file.read()))
    for warning in imported.warnings:
        click.echo(str(warning), err=True)
    click.echo(imported.text, nl=False)


@main.command()
@click.option("--netns", metavar="NAME", help="The network namespace to report on.")
@json_option("Print the record as one line of JSON, with ok (the exit code is 0) and problems.")
@click.pass_context
def status(ctx: click.Context, netns: str | None, as_json: bool) -> None:
    """Everything loaded in one view: policy, attachments, per-rule counters, connections, maps.

    \b
    Exit codes:
      0  enforcement is in place and the last change succeeded; or nothing is
         loaded, and no change failed, in a namespace that exists (a valid state)
      1  the last change failed (shown first, with everything else); an
         interface is detached or gone; no network namespace NAME; the state
         cannot be read
    """
    scope = Scope(netns)
    _require_namespace(scope)
    record = enforcer.status(scope)
    problems = _problems(record)
    if as_json:
        shown = record if record is not None else {"backend": None, "netns": netns}
        _emit({**shown, "ok": not problems, "problems": problems,
               **({"error": "; ".join(problems)} if problems else {})})
    else:
        _say_status(record, netns)
    if problems:
        click.echo(f"isoebpf: status: {'; '.join(problems)}", err=True)
        ctx.exit(1)


def _problems(record: dict[str, Any] | None) -> list[str]:
    """What makes `status` exit 1: a failed last change, attachments not in place."""
    if record is None:
        return []
    problems = []
    if record.get("failure"):
        problems.append("the last change failed")
    problems += [f"{a['ifname']} ({a['mode']}) {a['state']}" for a in record.get("attachments", [])
                 if a.get("state", "attached") != "attached"]
    return problems


def _say_status(record: dict[str, Any] | None, netns: str | None) -> None:
    failure = (record or {}).get("failure")
    if failure:
        click.echo(f"LAST CHANGE FAILED at {failure['at']} (on-failure {failure['on_failure']}): "
                   f"{failure['consequence']}")
        click.echo(f"  {failure['error']}")
    if record is None or record.get("backend") is None:
        click.echo("nothing loaded" + (f" in namespace {netns}" if netns else ""))
        return
    if record.get("audit"):
        click.echo(AUDIT_BANNER)
    click.echo(f"backend {record['backend']}, policy {record['policy']} "
               f"(digest {record['digest'][:12]}), generation {record['generation']}, "
               f"loaded {record['loaded_at']}, on failure: {record.get('on_failure', 'closed')}")
    click.echo("interfaces:")
    for a in record["attachments"]:
        prog = f"prog {a['prog_id']}" if a.get("prog_id") else ""
        click.echo(f"  {a['ifname']:15} {a['mode']:10} {a['state']:10} {prog:10} {a['reason']}")
    click.echo(f"  {'rule':16} {'packets':>10} {'bytes':>12}  meaning")
    for c in record.get("counters", []):
        click.echo(f"  {c['rule']:16} {c['packets']:>10} {c['bytes']:>12}  {c['text']}")
    click.echo(f"tracked connections: {record.get('connections', 0)}")
    if record.get("iptables_layout"):
        click.echo(f"iptables-{record['flavour']}: chain {record['chain']}, "
                   f"{record['iptables_layout']} layout")
    for name, info in sorted(record.get("sets", {}).items()):
        click.echo(f"  set {name:24} {info['entries']:>8} / {info['max_entries']}  {info['type']}")
    for name, fill in sorted(record.get("maps", {}).items()):
        click.echo(f"  map {name:14} {fill['entries']:>8} / {fill['max_entries']}")


@main.command()
@click.option("--netns", metavar="NAME", help="The network namespace to clean up.")
@json_option("Print what was removed as one line of JSON.")
def unload(netns: str | None, as_json: bool) -> None:
    """Remove every program, pin, chain and set isoebpf made; safe to repeat.

    After 'ip netns del' it removes isoebpf's state of the namespace; a
    namespace that does not exist and of which isoebpf holds nothing is an error.
    """
    require_privilege("unload")
    scope = Scope(netns)
    gone = scope.namespace_gone
    if gone and not scope.holds_state:
        _require_namespace(scope)  # raises: no namespace, and nothing of ours to remove either
    if gone:
        click.echo(f"namespace {netns} is gone, and its interfaces and rules with it: "
                   "removing isoebpf's own state of it", err=as_json)
    removed = [what for name in registry.BACKENDS for what in registry.get(name).unload(scope)]
    with scope.locked():  # so that the scope's lock goes with its last file
        if flowlog.forget(scope):
            removed.append("flow log")
        scope.clear_failure()
        scope.clear_switch()  # both backends are gone: nothing is left to finish
    if as_json:
        _emit({"ok": True, "netns": netns, "namespace_gone": gone, "removed": removed,
               "unloaded": bool(removed)})
        return
    for what in removed:
        click.echo(f"removed {what}")
    click.echo("unloaded" if removed else "nothing was loaded")


def etcd_options(func: _F) -> _F:
    """Where the cluster's etcd is and how to reach it (each also from the environment)."""
    for option in reversed((
        click.option("--etcd", "etcd_urls", metavar="URLS", envvar="ISOEBPF_ETCD",
                     help="The etcd cluster's client URLs, comma-separated "
                          "(https://10.0.0.1:2379,...). Env: ISOEBPF_ETCD."),
        click.option("--prefix", "etcd_prefix", metavar="PREFIX", envvar="ISOEBPF_ETCD_PREFIX",
                     default="/isoebpf/", show_default=True,
                     help="The cluster's keys live under it (clusters sharing an etcd take one each)."),
        click.option("--etcd-ca", type=click.Path(exists=True, dir_okay=False), envvar="ISOEBPF_ETCD_CA",
                     help="The CA that signed the etcd endpoints' certificates (https)."),
        click.option("--etcd-cert", type=click.Path(exists=True, dir_okay=False), envvar="ISOEBPF_ETCD_CERT",
                     help="Our client certificate (etcd's --client-cert-auth), without a common name: "
                          "etcd's gateway refuses one that has it once auth is on."),
        click.option("--etcd-key", type=click.Path(exists=True, dir_okay=False), envvar="ISOEBPF_ETCD_KEY",
                     help="The client certificate's key."),
        click.option("--etcd-user", envvar="ISOEBPF_ETCD_USER",
                     help="The etcd user to log in as (etcd auth on): its password from --etcd-password-file."),
        click.option("--etcd-password-file", type=click.Path(exists=True, dir_okay=False),
                     envvar="ISOEBPF_ETCD_PASSWORD_FILE", help="The file holding the etcd user's password."),
    )):
        func = option(func)
    return func


# An agent's request to etcd gives up sooner than a command's: its heartbeat is how it
# learns that etcd is out of reach (and says so) while it goes on enforcing.
AGENT_ETCD_TIMEOUT = 2.0


def _cluster(etcd_urls: str | None, etcd_prefix: str, etcd_ca: str | None, etcd_cert: str | None,
             etcd_key: str | None, etcd_user: str | None, etcd_password_file: str | None,
             timeout: float = 5.0) -> tuple[Any, Any]:
    """(etcd client, layout) of the options etcd_options gives."""
    from .cluster.etcd import Credentials, Etcd
    from .cluster.layout import Layout

    if not etcd_urls:
        raise click.UsageError("no etcd given: --etcd URLS (or ISOEBPF_ETCD)")
    if bool(etcd_cert) != bool(etcd_key):
        raise click.UsageError("--etcd-cert and --etcd-key go together")
    if bool(etcd_user) != bool(etcd_password_file):
        raise click.UsageError("--etcd-user and --etcd-password-file go together")
    try:
        layout = Layout(etcd_prefix)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--prefix") from err
    urls = [u.strip() for u in etcd_urls.split(",") if u.strip()]
    return Etcd(urls, Credentials(etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password_file), timeout), layout


@main.group()
def cluster() -> None:
    """One policy for every node, kept in etcd: push it, see it, see who enforces it."""


@cluster.command(name="push")
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@etcd_options
@json_option()
@click.option("--quiet", is_flag=True, help="No progress on a terminal.")
def cluster_push(policy_file: str, as_json: bool, quiet: bool, **etcd: Any) -> None:
    """Publish POLICY as the cluster's next version: validated first (nothing is written
    on error), then only what differs from what is stored is written, and the agents
    switch to it as one."""
    from .cluster import store

    client, layout = _cluster(**etcd)
    with pipeline.collector_paused(), _progress(not (quiet or as_json) and _on_terminal()):
        compiled = _read(policy_file)
        pushed = store.push(client, layout, compiled.policy)
    head = pushed.head
    if as_json:
        _emit({"ok": True, "changed": pushed.changed, "version": head.version, "digest": head.digest,
               "revision": head.revision, "counts": pushed.plan.counts,
               "transactions": pushed.transactions, "seconds": round(pushed.seconds, 3)})
    elif pushed.changed:
        click.echo(f"pushed version {head.version} (digest {head.digest[:12]}, revision "
                   f"{head.revision}): {pushed.plan.summary()}; {pushed.transactions} "
                   f"transaction{'s' if pushed.transactions != 1 else ''}, {pushed.seconds:.2f} s")
    else:
        click.echo(f"unchanged: version {head.version} (digest {head.digest[:12]}) is this policy")


@cluster.command(name="diff")
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@etcd_options
@json_option()
def cluster_diff(policy_file: str, as_json: bool, **etcd: Any) -> None:
    """What pushing POLICY would write: one line a key (+ new, ~ changed, - removed).
    Exit 0 when nothing would change, 3 when something would."""
    from .cluster import layout as laid
    from .cluster import store

    client, layout = _cluster(**etcd)
    compiled = _read(policy_file)
    stored = store.read(client, layout)
    plan = laid.plan(layout, stored.items, compiled.policy)
    if as_json:
        _emit({"ok": True, "changed": bool(plan), "counts": plan.counts,
               "put": plan.puts, "delete": list(plan.deletes)})
    else:
        for key, text in sorted(plan.puts.items()):
            click.echo(f"{'~' if key in stored.items else '+'} {key} {text}")
        for key in plan.deletes:
            click.echo(f"- {key}")
        click.echo(plan.summary(), err=True)
    if plan:
        sys.exit(3)


@cluster.command(name="show")
@etcd_options
@click.option("--format", "form", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True,
              help="json prints the document the agents compile (a policy file that can be pushed).")
def cluster_show(form: str, **etcd: Any) -> None:
    """Print the policy the cluster publishes now, as a policy file."""
    import yaml

    from .cluster import layout as laid
    from .cluster import store

    client, layout = _cluster(**etcd)
    stored, head = store.published(client, layout)
    text, _ = laid.document(layout, stored.items)
    click.echo(f"# version {head.version}, digest {head.digest[:12]}, revision {head.revision}", err=True)
    if form == "json":
        click.echo(text, nl=False)
    else:
        click.echo(yaml.safe_dump(json.loads(text), sort_keys=False, default_flow_style=None, width=120),
                   nl=False)


@cluster.command(name="status")
@etcd_options
@json_option()
def cluster_status(as_json: bool, **etcd: Any) -> None:
    """One line a node: the version it enforces, in sync or behind, stale, errors. Exit 0
    only when every live node enforces the published version (and one does)."""
    from .cluster import store

    client, layout = _cluster(**etcd)
    head = store.read(client, layout).head
    rows = store.nodes(client, layout, head)
    live = [r for r in rows if r.alive]
    ok = bool(live) and all(r.in_sync for r in live)
    if as_json:
        _emit({"ok": ok, "version": head.version if head else None,
               "digest": head.digest if head else None, "revision": head.revision if head else None,
               "nodes": [{"node": r.node, "alive": r.alive, "in_sync": r.in_sync, "behind": r.behind,
                          "state": r.state(),
                          "report": dataclasses.asdict(r.report) if r.report else None} for r in rows]})
    else:
        click.echo(f"published: version {head.version}, digest {head.digest[:12]}, revision {head.revision}"
                   if head else "published: nothing yet")
        for r in rows:
            said = r.report
            version = f"version {said.version}" if said and said.version else "no version"
            extra = f" [{said.backend}/{said.mode}]" if said and said.backend else ""
            click.echo(f"{r.node:<20} {version:<12} {r.state()}{extra}")
            for error in said.errors if said else ():
                click.echo(f"{'':<20}   {error}")
        if not live:
            click.echo("no node is alive", err=True)
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False), required=False)
@click.option("--backend", "backend_name", type=click.Choice(["auto", *registry.BACKENDS]),
              default="auto", show_default=True)
@click.option("--mode", type=click.Choice(["auto", "xdp", "tc"]), default="auto", show_default=True)
@click.option("--iface", "ifaces", multiple=True, metavar="GLOB",
              help="Interfaces to enforce on, now and as they appear.")
@click.option("--netns", metavar="NAME", help="Act on this network namespace's interfaces.")
@click.option("--metrics", metavar="ADDR",
              help="Serve Prometheus metrics (/metrics) and the live page (/) on HOST:PORT.")
@click.option("--repair-interval", type=click.FloatRange(0.1, 3600), default=1.0,
              show_default=True, help="Seconds between drift checks.")
@click.option("--flow-rate", type=click.IntRange(0, 100000), default=flowlog.DEFAULT_FLOW_RATE, show_default=True,
              help="Verdicts a second (eBPF: each CPU) sampled into the flow log ('isoebpf flows'); "
                   "the kernel counts the rest; 0: no flow log.")
@click.option("--flow-interval", type=click.FloatRange(1, 3600), default=flowlog.BUCKET_SECONDS, show_default=True,
              help="Seconds of flows per line of the flow log.")
@force_option
@on_failure_option
@etcd_options
@click.option("--node", metavar="NAME", help="Cluster mode: this node's name in etcd (default: the hostname).")
@click.option("--lease-ttl", type=click.IntRange(2, 3600), default=10, show_default=True,
              help="Cluster mode: seconds after its last heartbeat that the node counts as stale.")
@audit_option
def agent(policy_file: str | None, backend_name: str, mode: str, ifaces: tuple[str, ...],
          netns: str | None, metrics: str | None, repair_interval: float, flow_rate: int,
          flow_interval: float, force: bool, on_failure: str, node: str | None, lease_ttl: int,
          audit: bool, **etcd: Any) -> None:
    """Stay running: reload on file change, enforce new interfaces, repair, export metrics.
    With --etcd (no POLICY): the cluster's policy, applied as each version is published,
    this node's status reported in etcd.

    SIGTERM ends the agent and leaves enforcement in place ('isoebpf unload' removes it).
    """
    from .backends import links
    from .service.agent import Agent
    from .service.docker import Engine

    require_privilege("agent")
    _require_namespace(Scope(netns))
    runner: Agent
    if etcd["etcd_urls"]:
        from .service.cluster_agent import ClusterAgent

        if policy_file:
            raise click.UsageError("give POLICY or --etcd, not both")
        client, layout = _cluster(**etcd, timeout=AGENT_ETCD_TIMEOUT)
        runner = ClusterAgent(f"etcd://{client.endpoint.split('://', 1)[-1]}{layout.prefix}", backend_name,
                              ifaces, mode, netns, repair_interval, force=force, on_failure=on_failure,
                              etcd=client, layout=layout, node=node or socket.gethostname(),
                              lease_ttl=lease_ttl, heartbeat_interval=lease_ttl / 5, docker=Engine(),
                              audit=audit)
    else:
        if not policy_file:
            raise click.UsageError("give POLICY (a file) or --etcd URLS (a cluster)")
        forced = pipeline.check_trusted(policy_file, force)
        if forced:
            click.echo(f"warning: {forced}; used anyway (--force)", err=True)
        runner = Agent(policy_file, backend_name, ifaces, mode, netns, repair_interval, force=force,
                       on_failure=on_failure, docker=Engine(), audit=audit)
    if flow_rate:
        runner.recorder = flowlog.Recorder(Scope(netns), flow_rate, runner.log, flow_interval)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if metrics:
        _serve_metrics(metrics, runner)
    runner.run(stop, lambda until, listening: links.link_changes(netns, until, listening))


def _serve_metrics(address: str, runner: Any) -> None:
    """Prometheus metrics at /metrics, and the live page at / (service/live.py)."""
    from prometheus_client import CollectorRegistry

    from .service import live
    from .service.metrics import StatusCollector

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise click.UsageError(f"--metrics takes HOST:PORT, not '{address}'")
    collectors = CollectorRegistry()
    collectors.register(StatusCollector(lambda: enforcer.status(runner.scope), runner.stats,
                                      lambda: runner.default_action, runner.on_failure))
    try:
        live.serve(host or "0.0.0.0", int(port), live.Sources(
            collectors, lambda: enforcer.status(runner.scope), runner.stats, runner.recorder))
    except OSError as err:
        raise IsoebpfError(f"cannot serve metrics on {address}: {err.strerror}") from err


@main.command()
@click.option("--netns", metavar="NAME", help="Trace the enforcement in this namespace.")
@click.option("--overlay", "overlays", multiple=True, metavar="NAME",
              help="Only packets from or to this overlay.")
@click.option("--rule", "rules", multiple=True, metavar="NAME",
              help="Only verdicts of this rule (a name such as allow:0, or a glob: 'allow:*').")
@click.option("--action", "actions", multiple=True, type=click.Choice(["allow", "drop", "reject"]),
              help="Only verdicts with this action.")
@click.option("--address", "addresses", multiple=True, metavar="CIDR",
              help="Only packets from or to this address or subnet.")
@json_option('One JSON object a line; an error as {"ok": false, "error": ...}.')
@click.option("--count", type=click.IntRange(1), help="Stop after this many shown events.")
@click.option("--timeout", type=click.FloatRange(0.1), help="Stop after this many seconds.")
@click.option("--rate", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Events a second (eBPF: each CPU; iptables: the namespace); the kernel counts "
                   "the rest as suppressed.")
def trace(netns: str | None, overlays: tuple[str, ...], rules: tuple[str, ...],
          actions: tuple[str, ...], addresses: tuple[str, ...], as_json: bool,
          count: int | None, timeout: float | None, rate: int) -> None:
    """Show verdicts live: source, destination, protocol/port, action, rule, interface."""
    from .service import trace as trace_mod

    scope = Scope(netns)
    _require_namespace(scope)
    record = scope.read()
    if record is None:
        raise IsoebpfError("nothing loaded" + (f" in namespace {netns}" if netns else ""))
    filters = trace_mod.Filters.build(overlays, record.get("overlays", {}), rules, actions,
                                      addresses)
    offset = trace_mod.clock_offset()
    deadline = time.monotonic() + timeout if timeout else None
    shown = 0
    tracer = registry.get(str(record["backend"])).tracer(scope, rate)
    with flowlog.tracing_turn(scope), tracer:
        click.echo(f"tracing {record['backend']} verdicts in "
                   f"{('namespace ' + netns) if netns else 'this namespace'}", err=True)
        try:
            # SIGTERM ends tracing as Ctrl-C does, so the tracer closes: the eBPF event
            # rate goes back to 0, the iptables trace table is deleted.
            signal.signal(signal.SIGTERM, _interrupt)
            while count is None or shown < count:
                left = deadline - time.monotonic() if deadline else 0.5
                if left <= 0:
                    break
                for verdict in tracer.verdicts(min(left, 0.5)):
                    if not filters.matches(verdict):
                        continue
                    click.echo(trace_mod.as_json(verdict, offset) if as_json
                               else trace_mod.line(verdict, offset))
                    shown += 1
                    if shown == count:
                        break
        except KeyboardInterrupt:
            pass
    click.echo(f"{shown} events shown; {tracer.suppressed} verdicts suppressed by the rate "
               f"limit, {tracer.lost} lost (ring full)", err=True)


# How long `flows` traces where no agent records and no --listen says.
FLOWS_LISTEN = 10.0


@main.command(name="flows")
@click.option("--netns", metavar="NAME", help="The flows of this namespace's enforcement.")
@click.option("--since", metavar="WHEN", help="Only flows seen since: a duration back (30s, 5m, 2h) or an ISO time.")
@click.option("--overlay", metavar="NAME", help="Only flows from or to this overlay.")
@click.option("--verdict", type=click.Choice(["allow", "drop", "reject"]), help="Only flows with this verdict.")
@json_option()
@click.option("--suggest", is_flag=True,
              help="Print the policy's allow lines that would admit the denied flows (YAML).")
@click.option("--plot", "plot_file", metavar="FILE", type=click.Path(dir_okay=False),
              help="Draw packets by verdict over time into FILE (PNG).")
@click.option("--listen", type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help="Trace live for this long rather than read the agent's flow log.")
@click.option("--rate", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="With --listen: events a second (eBPF: each CPU), as trace's --rate.")
def flows_cmd(netns: str | None, since: str | None, overlay: str | None, verdict: str | None,
              as_json: bool, suggest: bool, plot_file: str | None, listen: float | None, rate: int) -> None:
    """Connections by source, destination, port, verdict and rule, from the agent's flow log
    (or traced live): top talkers, and the denials one more rule would allow.

    Without an agent recording (its --flow-rate), it traces for 10 s itself.
    Counts are the verdicts the rate limit sampled; status has the exact totals.
    """
    scope = Scope(netns)
    _require_namespace(scope)
    record = scope.read()
    overlays = flowlog.Overlays((record or {}).get("overlays", {}))
    if overlay and overlay not in overlays.names:
        raise IsoebpfError(f"no overlay {overlay} in the loaded policy "
                           f"(it has {', '.join(overlays.names) or 'none'})")
    now = time.time()
    start = flowlog.parse_since(since, now) if since else 0.0
    log = flowlog.flow_log(scope)
    if listen is None and not log.exists():
        listen = FLOWS_LISTEN
        click.echo(f"no flow log at {log} (no agent records flows here): tracing for "
                   f"{listen:g} s", err=True)
    if listen is not None:
        buckets = flowlog.listen(scope, listen, rate)
        source = f"traced for {listen:g} s"
    else:
        buckets = flowlog.read(log, start)
        source = f"the flow log {log}"
    buckets = flowlog.filtered(buckets, flowlog.Filters(overlay, verdict), overlays)
    seen = flowlog.merged(buckets)
    denied = flowlog.denials(seen, overlays)
    lines = flowlog.suggest(denied) if suggest else []
    if plot_file:
        flowlog.plot(buckets, plot_file, f"verdicts in {('namespace ' + netns) if netns else 'this namespace'}")
    sampled = {"suppressed": sum(b.suppressed for b in buckets), "lost": sum(b.lost for b in buckets),
               "overflow": sum(b.overflow for b in buckets)}
    if as_json:
        _emit({"ok": True, "netns": netns, "source": source, "since": start or None,
               "flows": [f.as_json() for f in seen],
               "top_talkers": [{"src": src, "packets": n} for src, n in flowlog.top_talkers(seen)],
               "denials": [d.as_json() for d in denied], **({"suggest": lines} if suggest else {}),
               **sampled})
        return
    if suggest:
        if lines:
            click.echo(f"# under the policy's allow: these admit the {len(denied)} kinds of denied "
                       f"flows seen in {source}")
            click.echo("\n".join(lines))
        else:
            click.echo("no denied flow that one more rule would allow", err=True)
        return
    _say_flows(seen, denied, source, sampled)


def _say_flows(seen: list[flowlog.Flow], denied: list[flowlog.Denial], source: str,
               sampled: dict[str, int]) -> None:
    def clock(when: float) -> str:
        return time.strftime("%H:%M:%S", time.localtime(when))

    click.echo(f"{len(seen)} flows from {source}")
    click.echo(f"  {'source':24} {'destination':24} {'port':10} {'verdict':13} {'rule':14} "
               f"{'packets':>8}  first     last")
    for f in seen:
        shown = f.key.action + (" audit" if f.key.audit else "")
        click.echo(f"  {f.key.src:24} {f.key.dst:24} {f.service:10} {shown:13} {f.key.rule:14} "
                   f"{f.packets:>8}  {clock(f.first)}  {clock(f.last)}")
    click.echo("top talkers:")
    for src, packets in flowlog.top_talkers(seen):
        click.echo(f"  {src:24} {packets:>8} packets")
    click.echo("denials one more rule would allow:" if denied else
               "denials one more rule would allow: none")
    for d in denied:
        click.echo(f"  {d.src_overlay} -> {d.dst_overlay} {d.service}: {d.packets} packets in "
                   f"{d.flows} flows" + (" (audit: let through)" if d.audit else ""))
    if denied:
        click.echo("  ('isoebpf flows --suggest' prints the allow lines)")
    if any(sampled.values()):
        click.echo(f"sampled: {sampled['suppressed']} verdicts beyond the rate limit, {sampled['lost']} "
                   f"lost, {sampled['overflow']} beyond a bucket's flows (status counts them all)")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# Set by run(): the process ends when the command does, so a failed load may leave its
# early compile behind (in a process that goes on, the tests', it waits for it).
_program_ends_after_command = False
# Early compiles that failed loads gave up on (load), perhaps still running.
_abandoned: list[Any] = []


def run() -> None:
    """The program: `main`, then the exit. A failed load has said why; should the early
    compile it abandoned still run, the process ends now with the same status (the
    kernel frees what the compile holds) rather than wait for it, or finalize C++ under
    its feet."""
    global _program_ends_after_command
    _program_ends_after_command = True
    try:
        main()
    except SystemExit as done:
        if any(compiling.running() for compiling in _abandoned):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)
        raise


if __name__ == "__main__":
    run()
