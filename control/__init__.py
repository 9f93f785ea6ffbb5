"""isoebpf: isolation between overlay networks, enforced by eBPF."""
