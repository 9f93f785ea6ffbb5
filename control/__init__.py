"""isoebpf: isolation between overlay networks, enforced by eBPF.

The package reads like the pipeline it runs, each stage importing only those
below it (tests/unit/test_architecture.py holds the code to this):

    errors, resource          the ground: one exception hierarchy, the open/close shape
    policy/                   a policy file in, a validated model out
    ir/                       the model compiled to flat tables, and their reference semantics
    pipeline                  read -> check -> compile -> lint, the one entry from a file
    cluster/                  one policy for every node, kept in etcd: layout, client, push, follow
    backends/                 the IR enforced: eBPF maps and programs, or iptables and ipsets
    service/                  what runs around enforcement: the agent, metrics, trace
    cli                       the command line, the only module that imports click
    lab/                      throw-away networks for the demo, tests and benchmarks

docs/architecture.md draws it and says where new work goes.
"""
