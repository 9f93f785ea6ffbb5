"""The command line: a thin click layer, the only module that imports click."""

from __future__ import annotations

import json
import signal
import sys
import traceback
from types import FrameType
from typing import Any, TextIO

import click
import netaddr

from . import backend
from . import policy as policy_mod
from .compiler import compile_policy
from .errors import IsoebpfError, PolicyError
from .explain import Question, explain
from .ir import IR
from .state import Scope, require_privilege


class _Group(click.Group):
    """Turns our errors into one clear message and exit 1; --debug adds the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolicyError as err:
            for diagnostic in err.diagnostics:
                click.echo(str(diagnostic), err=True)
            count = sum(1 for d in err.diagnostics if d.severity == "error")
            click.echo(f"{count} error{'s' if count != 1 else ''}; nothing was applied", err=True)
            ctx.exit(1)
        except IsoebpfError as err:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"isoebpf: error: {err}", err=True)
            ctx.exit(1)


# Options `load` and `agent` share.
force_option = click.option(
    "--force", is_flag=True,
    help="Override safety refusals: a policy file others can write, another tool's XDP program "
         "or TC filter (replaced).")
on_failure_option = click.option(
    "--on-failure", type=click.Choice(backend.FAILURE_MODES), default="closed", show_default=True,
    help="When a change cannot be applied: closed keeps the policy in force; open removes all "
         "enforcement.")


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """isoebpf: isolation between overlay networks, enforced by eBPF."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _trusted(path: str, force: bool) -> None:
    """Refuse a policy file others could write (load, agent), unless --force."""
    problem = policy_mod.untrusted(path)
    if problem and not force:
        raise IsoebpfError(policy_mod.refusal(path, problem))
    if problem:
        click.echo(f"warning: {problem}; used anyway (--force)", err=True)


def _load(path: str) -> tuple[policy_mod.Policy, IR]:
    policy = policy_mod.load(path)
    for warning in policy.warnings:
        click.echo(str(warning), err=True)
    return policy, compile_policy(policy)


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
def validate(policy_file: str) -> None:
    """Check POLICY; print a one-line summary or every error."""
    policy, ir = _load(policy_file)
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def explain_cmd(policy_file: str, src: netaddr.IPAddress, dst: netaddr.IPAddress, proto: str,
                dport: int | None, as_json: bool) -> None:
    """The verdict for the first packet of a new connection, and the rule that decides it."""
    if proto == "icmp" and dport is not None:
        raise click.UsageError("--dport goes with --proto tcp or udp")
    _, ir = _load(policy_file)
    answer = explain(ir, Question(src, dst, proto, dport))
    if as_json:
        click.echo(json.dumps(answer, sort_keys=True))
        return
    what = proto if dport is None else f"{proto}/{dport}"
    src_where = answer["src_overlay"] or "no overlay"
    dst_where = answer["dst_overlay"] or "no overlay"
    click.echo(f"{src} ({src_where}) -> {dst} ({dst_where}) {what}: {answer['action']}")
    line = f", line {answer['line']}" if answer["line"] else ""
    click.echo(f"  decided by {answer['rule']} ({answer['rule_text']}{line}): {answer['reason']}")


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--backend", "backend_name", type=click.Choice(["auto", *backend.BACKENDS]),
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
def load(policy_file: str, backend_name: str, mode: str, ifaces: tuple[str, ...],
         netns: str | None, dry_run: bool, force: bool, on_failure: str,
         chain: str | None) -> None:
    """Start enforcing POLICY, or atomically replace the policy enforced."""
    if not dry_run:
        require_privilege("load")
    _trusted(policy_file, force)
    scope = Scope(netns)
    # A first eBPF load compiles the program (seconds): on another core, meanwhile.
    compiling = None if dry_run else backend.compile_early(backend_name, scope)
    try:
        with policy_mod.collector_paused():
            _enforce(policy_file, backend_name, mode, ifaces, scope, dry_run, force, on_failure,
                     chain, compiling)
    finally:
        if compiling is not None:
            compiling.discard()


def _enforce(policy_file: str, backend_name: str, mode: str, ifaces: tuple[str, ...],
             scope: Scope, dry_run: bool, force: bool, on_failure: str, chain: str | None,
             compiling: Any | None) -> None:
    _, ir = _load(policy_file)
    globs = list(ifaces) or list(ir.interfaces or ())
    netns = scope.netns
    where = f"namespace {netns}" if netns else "this namespace"
    chosen, why = backend.choose(backend_name, compiling)
    click.echo(f"backend {chosen}: {why}")
    if chain and chosen != "iptables":
        raise click.UsageError(f"--chain names the iptables backend's chain, not {chosen}'s")
    if dry_run:
        click.echo(f"would enforce {policy_file} (digest {ir.digest[:12]}) with {chosen} in {where} "
                   f"on interfaces matching {', '.join(globs) or '(none given)'}; nothing changed")
        return
    extra = {"chain": chain} if chain else {}
    chosen, report, notes = backend.load(backend_name, chosen, ir, scope, globs, mode, policy_file,
                                        force=force, on_failure=on_failure, compiling=compiling,
                                        **extra)
    for note in notes:
        click.echo(note)
    if report.replaced_layout:
        click.echo(f"removed older state ({report.replaced_layout}) instead of reusing it")
    click.echo(f"enforcing {policy_file} (digest {ir.digest[:12]}) with {chosen} in {where}, "
               f"generation {report.generation}")
    if report.compiled:
        click.echo(f"compiled the program in {report.compile_seconds:.2f} s")
    click.echo(f"applied in {report.apply_seconds * 1000:.0f} ms")
    for a in report.attachments:
        click.echo(f"  {a.ifname:15} {a.mode:10} {a.reason}")


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
    from . import iptables_layout

    _, ir = _load(policy_file)
    if layout_kind == "auto":
        found, hidden = backend.module(backend_name).set_types()
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
    from .importer import import_layout

    rule_files = [(f.name, version, f.read()) for f, version in ((v4_file, 4), (v6_file, 6)) if f]
    if not rule_files:
        raise click.UsageError("give --iptables-save FILE, --ip6tables-save FILE or both")
    imported = import_layout(rule_files, (set_file.name, set_file.read()))
    for warning in imported.warnings:
        click.echo(str(warning), err=True)
    click.echo(imported.text, nl=False)


@main.command()
@click.option("--netns", metavar="NAME", help="The network namespace to report on.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(netns: str | None, as_json: bool) -> None:
    """Everything loaded in one view: policy, attachments, per-rule counters, connections, maps."""
    scope = Scope(netns)
    record = backend.status(scope)
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        return
    failure = (record or {}).get("failure")
    if failure:
        click.echo(f"LAST CHANGE FAILED at {failure['at']} (on-failure {failure['on_failure']}): "
                   f"{failure['consequence']}")
        click.echo(f"  {failure['error']}")
    if record is None or record.get("backend") is None:
        click.echo("nothing loaded" + (f" in namespace {netns}" if netns else ""))
        return
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
def unload(netns: str | None) -> None:
    """Remove every program, pin, chain and set isoebpf made; safe to repeat."""
    require_privilege("unload")
    scope = Scope(netns)
    if scope.namespace_gone:
        click.echo(f"namespace {netns} is gone, and its interfaces and rules with it: "
                   "removing isoebpf's own state of it")
    removed = [what for name in backend.BACKENDS for what in backend.module(name).unload(scope)]
    with scope.locked():  # so that the scope's lock goes with its last file
        scope.clear_failure()
    for what in removed:
        click.echo(f"removed {what}")
    click.echo("unloaded" if removed else "nothing was loaded")


@main.command()
@click.argument("policy_file", metavar="POLICY", type=click.Path(dir_okay=False))
@click.option("--backend", "backend_name", type=click.Choice(["auto", *backend.BACKENDS]),
              default="auto", show_default=True)
@click.option("--mode", type=click.Choice(["auto", "xdp", "tc"]), default="auto", show_default=True)
@click.option("--iface", "ifaces", multiple=True, metavar="GLOB",
              help="Interfaces to enforce on, now and as they appear.")
@click.option("--netns", metavar="NAME", help="Act on this network namespace's interfaces.")
@click.option("--metrics", metavar="ADDR", help="Serve Prometheus metrics on HOST:PORT.")
@click.option("--repair-interval", type=click.FloatRange(0.1, 3600), default=1.0,
              show_default=True, help="Seconds between drift checks.")
@force_option
@on_failure_option
def agent(policy_file: str, backend_name: str, mode: str, ifaces: tuple[str, ...],
          netns: str | None, metrics: str | None, repair_interval: float, force: bool,
          on_failure: str) -> None:
    """Stay running: reload on file change, enforce new interfaces, repair, export metrics.

    SIGTERM ends the agent and leaves enforcement in place ('isoebpf unload' removes it).
    """
    import threading

    from .agent import Agent
    from .backends import links

    require_privilege("agent")
    _trusted(policy_file, force)
    runner = Agent(policy_file, backend_name, ifaces, mode, netns, repair_interval, force=force,
                   on_failure=on_failure)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if metrics:
        _serve_metrics(metrics, runner)
    runner.run(stop, lambda until, listening: links.new_links(netns, until, listening))


def _serve_metrics(address: str, runner: Any) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from .metrics import StatusCollector

    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise click.UsageError(f"--metrics takes HOST:PORT, not '{address}'")
    registry = CollectorRegistry()
    registry.register(StatusCollector(lambda: backend.status(runner.scope), runner.stats,
                                      lambda: runner.default_action, runner.on_failure))
    try:
        start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
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
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.option("--count", type=click.IntRange(1), help="Stop after this many shown events.")
@click.option("--timeout", type=click.FloatRange(0.1), help="Stop after this many seconds.")
@click.option("--rate", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Events a second (eBPF: each CPU; iptables: the namespace); the kernel counts "
                   "the rest as suppressed.")
def trace(netns: str | None, overlays: tuple[str, ...], rules: tuple[str, ...],
          actions: tuple[str, ...], addresses: tuple[str, ...], as_json: bool,
          count: int | None, timeout: float | None, rate: int) -> None:
    """Show verdicts live: source, destination, protocol/port, action, rule, interface."""
    import time

    from . import trace as trace_mod

    scope = Scope(netns)
    record = scope.read()
    if record is None:
        raise IsoebpfError("nothing loaded" + (f" in namespace {netns}" if netns else ""))
    filters = trace_mod.Filters.build(overlays, record.get("overlays", {}), rules, actions,
                                      addresses)
    offset = trace_mod.clock_offset()
    deadline = time.monotonic() + timeout if timeout else None
    shown = 0
    tracer = backend.module(str(record["backend"])).tracer(scope, rate)
    with tracer:
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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
