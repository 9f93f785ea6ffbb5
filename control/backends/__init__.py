"""Backends: the only modules that touch the kernel (bcc, bpf(2), netlink, iptables)."""
