"""The iptables backend: the IR as the DC/OS guide's iptables + ipset layout.

Pure half: `layout` (the IR as restore text), `saved` (iptables-save and
ipset save text as values) and `importer` (a hand-built layout back into a
policy). Kernel half: `backend` (the Backend: load, update, status, unload)
and `nftrace` (verdicts from nf_tables' packet tracing). Imports the shared
floor of `isoebpf.backends` and the stages below it.
"""
