"""Lab: two "nodes" joined by a VXLAN overlay, each carrying its carved share of the overlays.

As DC/OS carves each agent's subnet out of an overlay network: IT is
10.250.0.0/16 and node A hosts 10.250.1.0/24, node B 10.250.2.0/24; HR
likewise out of 192.168.0.0/16. Each node is a namespace with one bridge per
carved subnet and hosts behind it (the testbed's pieces), a veth to the other
node as the underlay, and a VXLAN device over it that carries traffic between
the nodes' subnets:

    hosts -- br-it-a, br-hr-a [node A] vx0 ~~ underlay veth ~~ vx0 [node B] br-it-b, br-hr-b -- hosts

Used by the multi-node integration test; everything it makes it removes on exit.

Built from `testbed`'s pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import netaddr

from .testbed import Host, Network, Testbed, _ip, bare_address

VXLAN_ID = "42"
VXLAN_PORT = "4789"
VXLAN = "vx0"
UNDERLAY = "underlay"


@dataclass(frozen=True)
class Node:
    name: str  # short: the namespace is <prefix>-<name>
    underlay: str  # this node's address on the underlay veth, with prefix length
    transit: str  # this node's address on the VXLAN device, with prefix length
    networks: tuple[str, ...]  # names of the carved subnets it carries


@dataclass
class MultiNode(Testbed):
    __test__ = False

    nodes: tuple[Node, ...] = ()

    node = Testbed.netns  # a node's namespace is named as a host's

    def node_of_network(self, network: str) -> Node:
        return next(n for n in self.nodes if network in n.networks)

    def router_of(self, host: Host) -> str:
        return self.node(self.node_of_network(host.network).name)

    def _open(self) -> None:
        a, b = self.nodes
        for node in self.nodes:
            self._add_router(self.node(node.name))
        _ip("-n", self.node(a.name), "link", "add", UNDERLAY, "type", "veth", "peer", "name",
            UNDERLAY, "netns", self.node(b.name))
        for node, other in ((a, b), (b, a)):
            ns = self.node(node.name)
            _ip("-n", ns, "addr", "add", node.underlay, "dev", UNDERLAY)
            _ip("-n", ns, "link", "set", UNDERLAY, "up")
            _ip("-n", ns, "link", "add", VXLAN, "type", "vxlan", "id", VXLAN_ID,
                "local", bare_address(node.underlay), "remote", bare_address(other.underlay),
                "dstport", VXLAN_PORT, "dev", UNDERLAY)
            _ip("-n", ns, "addr", "add", node.transit, "dev", VXLAN)
            _ip("-n", ns, "link", "set", VXLAN, "up")
            for net in (n for n in self.networks if n.name in node.networks):
                self._add_bridge(ns, net)
            for net in (n for n in self.networks if n.name in other.networks):
                subnet = str(netaddr.IPNetwork(net.gateway).cidr)
                _ip("-n", ns, "route", "add", subnet, "via", bare_address(other.transit), "dev", VXLAN)
        for host in self.hosts:
            self._plug(host)




def it_hr_two_nodes() -> MultiNode:
    """IT and HR, each carved into one /24 per node; one host of each on each node."""
    networks = [Network("it-a", "10.250.1.1/24"), Network("hr-a", "192.168.1.1/24"),
                Network("it-b", "10.250.2.1/24"), Network("hr-b", "192.168.2.1/24")]
    hosts = [Host("it-a1", "it-a", "10.250.1.10"), Host("hr-a1", "hr-a", "192.168.1.10"),
             Host("it-b1", "it-b", "10.250.2.10"), Host("hr-b1", "hr-b", "192.168.2.10")]
    nodes = (Node("node-a", "172.31.0.1/30", "10.255.0.1/24", ("it-a", "hr-a")),
             Node("node-b", "172.31.0.2/30", "10.255.0.2/24", ("it-b", "hr-b")))
    return MultiNode(networks, hosts, nodes=nodes)
