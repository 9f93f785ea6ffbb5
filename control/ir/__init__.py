"""IR stage: the policy model compiled to flat tables, and what those tables mean.

Owns the IR and its numbering (`tables`, an ABI shared with bpf/abi.h), the
compiler, the lints that need the compiled form, the reference evaluator
(`evaluate`, the executable spec every backend is tested against) and
`explain`. Pure Python; imports the policy stage and `isoebpf.errors` only.
"""
