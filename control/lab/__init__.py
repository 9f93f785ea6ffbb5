"""Lab: throw-away networks in namespaces, for `make demo`, the tests and the benchmarks.

Not part of enforcement: nothing in the product imports it. Owns the testbed
(a router namespace with one bridge per network), the two-node VXLAN variant,
the probes (real sockets that report what a user would see), an etcd
cluster on loopback for the cluster mode and a Docker engine in a namespace.
Imports only `isoebpf.resource`.
"""
