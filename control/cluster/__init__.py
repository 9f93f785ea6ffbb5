"""Cluster stage: one policy for every node, kept in etcd.

Owns the policy's layout in etcd (`layout`: one key per overlay, exception and
rule, a header and a head key that publishes a complete version; pure), the
etcd client (`etcd`: the only module that imports etcd3gw, with endpoint
failover and a watch that resumes, resyncs and never hangs on a lost stream),
and what reads and writes a cluster's keys (`store`: push, show, node status).
Imports the pipeline and the stages below it; the agent (`service`) and the
CLI use it, and nothing here touches a kernel.
"""
