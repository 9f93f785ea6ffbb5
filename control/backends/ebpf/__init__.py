"""The eBPF backend: bpf/ compiled by bcc, its maps written from the IR, its programs attached.

Pure half: `abi` (the ctypes mirror of bpf/abi.h and the packed key layouts)
and `capacity` (whether a policy fits the maps). Kernel half: `bpfsys` (bpf(2)
through ctypes), `program` (compile, write and read maps), `ringbuf` (the
event ring buffer, read through libbpf) and `backend` (the Backend: load, update, status, unload, trace).
Imports the shared floor of `isoebpf.backends` and the stages below it.
"""
