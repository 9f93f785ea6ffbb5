"""`isoebpf trace`'s filters and formats, on made-up verdicts."""

from __future__ import annotations

import json

import netaddr
import pytest

from isoebpf.backends.interface import Verdict
from isoebpf.errors import IsoebpfError
from isoebpf.service.trace import Filters, as_json, line

OVERLAYS = {"it": ["10.250.0.0/16"], "hr": ["192.168.0.0/16", "fd00:4852::/48"]}


def verdict(src: str, dst: str, rule: str = "allow:0", action: str = "allow",
            proto: int = 6, family: int = 4) -> Verdict:
    return Verdict(1_000_000_000, "v-hr1", family, proto, netaddr.IPAddress(src), 40000,
                   netaddr.IPAddress(dst), 80, action, rule, "hr -> it tcp/80")


def filters(overlays: tuple[str, ...] = (), rules: tuple[str, ...] = (),
            actions: tuple[str, ...] = (), addresses: tuple[str, ...] = ()) -> Filters:
    return Filters.build(overlays, OVERLAYS, rules, actions, addresses)


@pytest.mark.parametrize(("chosen", "shown"), [
    (filters(), True),
    (filters(overlays=("it",)), True),
    (filters(overlays=("hr",)), True),
    (filters(rules=("allow:*",)), True),
    (filters(rules=("default",)), False),
    (filters(actions=("reject", "drop")), False),
    (filters(addresses=("10.250.1.10",)), True),
    (filters(addresses=("10.250.2.0/24",)), False),
    (filters(overlays=("it",), actions=("allow",), addresses=("192.168.1.0/24",)), True),
])
def test_filters(chosen: Filters, shown: bool) -> None:
    assert chosen.matches(verdict("192.168.1.10", "10.250.1.10")) is shown


def test_overlay_filter_is_about_either_end() -> None:
    assert not filters(overlays=("hr",)).matches(verdict("10.250.1.10", "10.250.2.20"))
    assert filters(overlays=("hr",)).matches(verdict("fd00:4852::10", "fd00:4852::20",
                                                     family=6))


def test_non_ip_frames_pass_only_unfiltered() -> None:
    arp = verdict("::", "::", rule="unfiltered", proto=0, family=0)
    assert filters().matches(arp)
    assert not filters(addresses=("::/0",)).matches(arp)
    assert "non-ip" in line(arp, 0.0) and json.loads(as_json(arp, 0.0))["src"] == "-"


def test_unknown_overlay_and_bad_address_are_refused() -> None:
    with pytest.raises(IsoebpfError, match="no overlay finance"):
        filters(overlays=("finance",))
    with pytest.raises(IsoebpfError, match="--address"):
        filters(addresses=("10.0.0.300",))


def test_line_and_json() -> None:
    v = verdict("192.168.1.10", "10.250.1.10")
    shown = line(v, 0.0)
    assert "192.168.1.10:40000 -> 10.250.1.10:80" in shown
    assert shown.split()[1:4] == ["v-hr1", "tcp", "192.168.1.10:40000"]
    assert "allow:0 (hr -> it tcp/80)" in shown
    record = json.loads(as_json(v, 100.0))
    assert record["time"] == 101.0 and record["rule"] == "allow:0" and record["dport"] == 80
    six = verdict("fd00:4852::10", "fd00:4852::20", family=6)
    assert "[fd00:4852::10]:40000" in line(six, 0.0)
