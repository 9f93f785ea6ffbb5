"""Service stage: what runs around enforcement for the people who operate it.

Owns the agent (`agent`: follow the policy file and the interfaces, repair
drift), its Prometheus metrics (`metrics`) and trace's filters and formats
(`trace`). Imports the pipeline and the backends' top floor (`enforcer`,
`registry`) and shared floor; never the CLI.
"""
