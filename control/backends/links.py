"""Backends stage, shared floor: interfaces and attachments over netlink (pyroute2), in any named namespace.

The control plane stays in the root namespace (where bpffs and the pins are)
and reaches a namespace's interfaces through a netlink socket opened inside
it, because `ip netns exec` remounts /sys and hides /sys/fs/bpf.

Used by the eBPF backend (attach) and the agent (new links); builds on `state` for namespace paths.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

from ..errors import BackendError
from .state import NETNS_DIR

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4  # since 5.7: replace only the program IFLA_XDP_EXPECTED_FD names
XDP_MODE_FLAGS = {"xdp": XDP_FLAGS_DRV_MODE, "xdpgeneric": XDP_FLAGS_SKB_MODE}

CLSACT_INGRESS = "ffff:fff2"
# Our filter's place on clsact ingress: a fixed priority and handle, so we find
# (and only ever remove) our own filter among other tools' filters.
TC_PRIO = 7
TC_HANDLE = 0x150E
TC_NAME = "isoebpf"


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str  # "veth", "vxlan", "bridge", ...; "" for a physical device


# Open sockets kept per thread and namespace: opening one in another namespace forks a
# helper (~40 ms), which a long-running agent or a run of updates would pay each time.
_kept = threading.local()
os.register_at_fork(after_in_child=lambda: vars(_kept).clear())


@contextmanager
def netlink(netns: str | None, keep: bool = True) -> Iterator[Any]:
    """A netlink socket in the given namespace (None: our own); reused by the same
    thread while the namespace is the same one (not deleted and re-made)."""
    try:
        identity = (netns, os.stat(NETNS_DIR / netns).st_ino if netns else 0)
    except OSError as err:
        raise BackendError(f"cannot open network namespace '{netns}': {err} "
                           "(does 'ip netns list' show it?)") from err
    kept: dict[Any, Any] = vars(_kept).setdefault("sockets", {})
    sock = kept.pop(identity, None) if keep else None
    if sock is None:
        try:
            sock = IPRoute() if netns is None else NetNS(netns, flags=0)
        except (OSError, NetlinkError) as err:
            raise BackendError(f"cannot open network namespace '{netns}': {err} "
                               "(does 'ip netns list' show it?)") from err
    try:
        yield sock
    except BaseException:
        sock.close()  # its state is unknown after a failure
        raise
    if keep and identity not in kept:
        kept[identity] = sock
    else:
        sock.close()


def links(sock: Any) -> list[Link]:
    found = []
    for msg in sock.get_links():
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        found.append(Link(msg.get_attr("IFLA_IFNAME"), msg["index"], kind or ""))
    return found


def matching(present: Sequence[Link], globs: Sequence[str]) -> list[Link]:
    """Interfaces whose names match any glob; never the loopback."""
    return [link for link in present
            if link.name != "lo" and any(fnmatch.fnmatchcase(link.name, g) for g in globs)]


def xdp_state(sock: Any, index: int) -> tuple[int, str | None]:
    """(program id, mode) of the XDP program on an interface; (0, None) if none."""
    (msg,) = sock.get_links(index)
    xdp = msg.get_attr("IFLA_XDP")
    if not xdp:
        return 0, None
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0), attached or None


def attach_xdp(sock: Any, link: Link, prog_fd: int, mode: str, replace: bool) -> None:
    """Attach in `mode` ("xdp" native or "xdpgeneric"); refuse to displace another
    program unless `replace` (ours being updated, or --force)."""
    flags = XDP_MODE_FLAGS[mode] | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
    try:
        sock.link("set", index=link.index,
                  xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})
    except NetlinkError as err:
        if err.code == errno.EBUSY:
            raise BackendError(f"{link.name} already has an XDP program that is not isoebpf's; "
                               "remove it or load with --force") from err
        raise BackendError(f"cannot attach XDP ({mode}) to {link.name}: {err}") from err


def swap_xdp(sock: Any, link: Link, prog_fd: int, expected_fd: int, mode: str) -> None:
    """Replace the program `expected_fd` on `link` by `prog_fd` in one step, only if it is
    still there (XDP_FLAGS_REPLACE): a program another tool put there meanwhile stays."""
    flags = XDP_MODE_FLAGS[mode] | XDP_FLAGS_REPLACE
    try:
        sock.link("set", index=link.index,
                  xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_EXPECTED_FD", expected_fd),
                                 ("IFLA_XDP_FLAGS", flags)]})
    except NetlinkError as err:
        if err.code == errno.EEXIST:
            raise BackendError(f"{link.name}'s XDP program changed under us: not replaced") from err
        raise BackendError(f"cannot replace XDP ({mode}) on {link.name}: {err}") from err


def detach_xdp(sock: Any, link: Link, mode: str) -> None:
    try:
        sock.link("set", index=link.index,
                  xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", XDP_MODE_FLAGS[mode])]})
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise BackendError(f"cannot detach XDP from {link.name}: {err}") from err


def _ingress_filters(sock: Any, index: int) -> list[tuple[int, str | None, dict[str, Any]]]:
    """(priority, kind, bpf attributes) of each filter entry on clsact ingress. A
    priority's own header entry is a bpf entry without attributes."""
    try:
        found = sock.get_filters(index=index, parent=CLSACT_INGRESS)
    except NetlinkError:
        return []
    return [(f["info"] >> 16, f.get_attr("TCA_KIND"),
             dict((f.get_attr("TCA_OPTIONS") or {}).get("attrs") or []))
            for f in found]


def _ours(kind: str | None, attrs: dict[str, Any]) -> bool:
    return kind == "bpf" and attrs.get("TCA_BPF_NAME") == TC_NAME


def has_clsact(sock: Any, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in sock.get_qdiscs(index=index))


def _slot_taken(sock: Any, index: int) -> bool:
    """Another tool's filter at our priority on clsact ingress (replacing ours would drop it)."""
    return any(prio == TC_PRIO and not _ours(kind, attrs) and (kind != "bpf" or attrs)
               for prio, kind, attrs in _ingress_filters(sock, index))


def attach_tc(sock: Any, link: Link, prog_fd: int, replace: bool = False) -> bool:
    """Put our filter on clsact ingress (direct action); True if we added clsact.
    Refuse to displace another tool's filter in our slot unless `replace` (--force)."""
    added = False
    taken = _slot_taken(sock, link.index)
    if taken and not replace:
        raise BackendError(f"{link.name} already has a TC ingress filter that is not isoebpf's "
                           f"at priority {TC_PRIO}: remove it or load with --force")
    try:
        if taken:  # --force: the other filters at our priority give way
            sock.tc("del-filter", index=link.index, parent=CLSACT_INGRESS, prio=TC_PRIO)
        if not has_clsact(sock, link.index):
            sock.tc("add", "clsact", link.index)
            added = True
        sock.tc("replace-filter", "bpf", link.index, TC_HANDLE, fd=prog_fd, name=TC_NAME,
                parent=CLSACT_INGRESS, prio=TC_PRIO, classid=1, direct_action=True)
    except NetlinkError as err:
        raise BackendError(f"cannot attach TC ingress to {link.name}: {err}") from err
    return added


def has_our_tc(sock: Any, index: int) -> bool:
    return any(_ours(kind, attrs) for _, kind, attrs in _ingress_filters(sock, index))


def detach_tc(sock: Any, link: Link, remove_clsact: bool) -> None:
    """Remove our filter; the clsact qdisc too if we added it and nothing else uses it."""
    try:
        if has_our_tc(sock, link.index):
            sock.tc("del-filter", "bpf", link.index, TC_HANDLE, parent=CLSACT_INGRESS,
                    prio=TC_PRIO)
        if remove_clsact and has_clsact(sock, link.index) and not sock.get_filters(
                index=link.index, parent=CLSACT_INGRESS):
            sock.tc("del", "clsact", link.index)
    except NetlinkError as err:
        if err.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise BackendError(f"cannot detach TC from {link.name}: {err}") from err


def link_changes(netns: str | None, stop: Any, listening: Any) -> Iterator[tuple[str, bool]]:
    """(name, True) as an interface appears (RTM_NEWLINK), (name, False) as one goes
    (RTM_DELLINK). Sets `listening` once no change can be missed. Blocks on netlink:
    run it in a daemon thread; `stop` is honoured at the next event."""
    with netlink(netns, keep=False) as sock:
        sock.bind()  # joins the link multicast group, among others
        known = {link.index for link in links(sock)}
        listening.set()
        while not stop.is_set():
            for msg in sock.get():
                event = msg.get("event")
                if event == "RTM_NEWLINK" and msg["index"] not in known:
                    known.add(msg["index"])
                    yield msg.get_attr("IFLA_IFNAME"), True
                elif event == "RTM_DELLINK" and msg["index"] in known:
                    known.discard(msg["index"])
                    yield msg.get_attr("IFLA_IFNAME"), False
