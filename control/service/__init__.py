"""Service stage: what runs around enforcement for the people who operate it.

Owns the agent (`agent`: follow the policy file and the interfaces, repair
drift), the agent of a cluster node (`cluster_agent`: its policy from etcd),
its Prometheus metrics (`metrics`), trace's filters and formats (`trace`), the flow
log (`flows`) and the live page (`page`).
Imports the pipeline, the cluster stage and the backends' top floor
(`enforcer`, `registry`) and shared floor; never the CLI.
"""
