"""The command line: a thin click layer, the only module that imports click."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import click
import netaddr

from . import policy as policy_mod
from .compiler import compile_policy
from .errors import IsoebpfError, PolicyError
from .explain import Question, explain
from .ir import IR


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


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """isoebpf: isolation between overlay networks, enforced by eBPF."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


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


if __name__ == "__main__":
    sys.exit(main())
