"""Policy stage: a policy file in, a validated `model.Policy` out.

Owns the file formats (`parse` for YAML, `jsonfile` for JSON), the checks
both formats share (`check`), the model (`model`), strict CIDR spelling
(`cidr`) and whether a file can be trusted (`trust`). Imports only
`isoebpf.errors`; knows nothing of what it compiles to.
"""
