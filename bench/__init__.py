"""The performance suite: isoebpf against iptables, nftables and no filter (`make bench`)."""
