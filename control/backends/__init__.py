"""Backends stage: the IR enforced in the kernel. The only modules that touch it
(bcc, bpf(2), netlink, iptables), and the only ones that import bcc or pyroute2.

Three floors: the shared floor (`interface`: the Backend protocol and its
reports; `state`: where a scope's state lives and its lock; `counts`, `links`);
the two backends, side by side and never importing each other (`ebpf/`,
`iptables/`, each with a pure half and a kernel half); and the top floor
(`registry`: backends by name; `enforcer`: choose, load, switch, fail).
Imports the IR stage and the pipeline below; never the service stage or the CLI.
"""
