"""Oversized policies are refused before anything changes, saying what to raise."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.backends.ebpf import abi, capacity
from isoebpf.backends.ebpf.abi import ISOEBPF_MAX_RULES, MAP_SIZE_MACROS
from isoebpf.backends.iptables import layout as iptables_layout
from isoebpf.errors import BackendError
from isoebpf.ir.tables import IR
from tests.policygen import many_overlays, many_ports


def overlays_ir(count: int, hairpin: bool = True) -> IR:
    return pipeline.loads(many_overlays(count, isolated=not hairpin), "big.yaml").ir


def ports_ir(count: int) -> IR:
    return pipeline.loads(many_ports(count), "ports.yaml").ir


PORTS_300 = ports_ir(300)  # compiled once, at collection, for the two cases below


def test_the_defaults_are_read_from_the_headers() -> None:
    sizes = capacity.default_sizes()
    assert set(MAP_SIZE_MACROS.values()) <= set(sizes)
    assert sizes["ISOEBPF_MAX_RULES"] == ISOEBPF_MAX_RULES


def test_a_policy_that_fits_has_no_problems() -> None:
    assert capacity.problems(ports_ir(10), capacity.sized(capacity.default_sizes()), {}) == []


@pytest.mark.parametrize(("ir", "macro", "limit", "needed"), [
    (overlays_ir(70), "ISOEBPF_MAX_CLASSES", 64, 70),
    (overlays_ir(20), "ISOEBPF_MAX_HAIRPINS", 16, 20),
    (PORTS_300, "ISOEBPF_MAX_ALLOWED", 256, 300),
    (PORTS_300, "ISOEBPF_MAX_RULES", 128, max(r.id for r in PORTS_300.rules) + 1),
], ids=["classes", "hairpins", "allowed", "rules"])
def test_too_big_names_the_map_the_count_the_limit_and_the_constant(
    ir: IR, macro: str, limit: int, needed: int,
) -> None:
    sizes = {**capacity.default_sizes(), macro: limit}
    found = capacity.problems(ir, capacity.sized(sizes), {})
    assert len(found) == 1, found
    assert f"needs {needed} " in found[0] and f"holds {limit} (" in found[0]
    assert f"({macro} in the environment, if set, bounds it)" in found[0]
    with pytest.raises(BackendError, match="nothing was changed"):
        capacity.check(ir, capacity.sized(sizes), {})


def test_an_update_must_fit_beside_the_policy_in_force() -> None:
    ir = ports_ir(100)
    sizes = capacity.sized({**capacity.default_sizes(), "ISOEBPF_MAX_ALLOWED": 150})
    assert capacity.problems(ir, sizes, {}) == []
    found = capacity.problems(ir, sizes, {"allowed": 60})
    assert len(found) == 1 and "beside the 60 of the policy in force" in found[0]


def test_iptables_sets_are_sized_to_the_policy_not_limited() -> None:
    """The iptables backend has no fixed table: a set that outgrows ipset's default
    maxelem (65536) is created with room for every element (ipset counts each port
    of a range)."""
    text = ("version: 1\ndefault: deny\noverlays:\n  a:\n    subnets: [10.1.0.0/16]\n"
            "  b:\n    subnets: [10.2.0.0/16]\n  c:\n    subnets: [10.3.0.0/16]\nallow:\n"
            "  - {from: a, to: b, ports: [tcp/1-40000]}\n  - {from: a, to: c, ports: [tcp/1-40000]}\n")
    ipset_text, _, _ = iptables_layout.render(pipeline.loads(text, "big.yaml").ir,
                                              iptables_layout.DEFAULT_CHAIN, iptables_layout.SET_TYPES)
    creates = [line for line in ipset_text.splitlines() if line.startswith("create dcos-allowed-ports ")]
    assert creates == [creates[0]] and creates[0].endswith(" maxelem 80000"), creates


ROOMY = capacity.Machine(cpus=2, available=2**40, available_from="the test's machine", memlock=None)


def test_maps_are_sized_for_the_policy_with_room_for_two_generations() -> None:
    needed = {"classes_v4": 64267, "classes_v6": 2, "exceptions": 1, "hairpins": 3,
              "allowed": 100063, "counters": 100021}
    sizes = capacity.sizes_for(needed, environ={})
    # 2.5 x what one generation needs, as a power of two; never below the headers' defaults.
    assert sizes["ISOEBPF_MAX_CLASSES"] == 1 << 18 and sizes["ISOEBPF_MAX_ALLOWED"] == 1 << 18
    assert sizes["ISOEBPF_MAX_RULES"] == 1 << 18
    defaults = capacity.default_sizes()
    assert sizes["ISOEBPF_MAX_EXCEPTIONS"] == defaults["ISOEBPF_MAX_EXCEPTIONS"]
    assert sizes["ISOEBPF_MAX_CONNECTIONS"] == defaults["ISOEBPF_MAX_CONNECTIONS"]
    assert capacity.refusals(needed, sizes, environ={}, machine=ROOMY) == []
    # A small policy gets the defaults.
    assert capacity.sizes_for({"classes_v4": 4, "allowed": 2, "counters": 20}, environ={}) == defaults


def test_the_environment_bounds_the_maps_a_policy_sizes_and_sets_the_others() -> None:
    environ = {"ISOEBPF_MAX_CLASSES": 1000, "ISOEBPF_MAX_CONNECTIONS": 4096}
    sizes = capacity.sizes_for({"classes_v4": 300, "allowed": 10, "counters": 30}, environ)
    assert (sizes["ISOEBPF_MAX_CLASSES"], sizes["ISOEBPF_MAX_CONNECTIONS"]) == (1000, 4096)


def test_a_policy_beyond_every_limit_is_refused_in_one_message_naming_each() -> None:
    needed = {"classes_v4": 5000, "allowed": 9000, "counters": 9000}
    environ = {"ISOEBPF_MAX_CLASSES": 1024, "ISOEBPF_MAX_ALLOWED": 2048}
    sizes = capacity.sizes_for(needed, environ)
    small = capacity.Machine(cpus=2, available=4 * 2**20, available_from="the memory cgroup /x (memory.max)",
                             memlock=2**20)
    found = capacity.refusals(needed, sizes, environ=environ, machine=small)
    assert len(found) == 4, found
    assert found[0].startswith("the policy needs 5000 entries in map classes_v4, and "
                               "ISOEBPF_MAX_CLASSES=1024 in the environment allows 1024: raise ISOEBPF_MAX_CLASSES (")
    assert found[1].startswith("the policy needs 9000 entries in map allowed, and ISOEBPF_MAX_ALLOWED=2048")
    assert "MiB, and the memory cgroup /x (memory.max) leaves 4 MiB" in found[2]
    assert "MiB, and RLIMIT_MEMLOCK allows 1 MiB" in found[3]


def test_the_estimate_of_the_maps_memory_follows_the_kernels_account() -> None:
    """The maps of a 100k-rule policy held 35.8 MiB of `memlock` here (2 CPUs, both slots filled)."""
    needed = {"classes_v4": 64267, "classes_v6": 2, "allowed": 100063, "counters": 100021}
    sizes = {**capacity.default_sizes(), "ISOEBPF_MAX_RULES": 131072, "ISOEBPF_MAX_CLASSES": 131072,
             "ISOEBPF_MAX_ALLOWED": 262144}
    assert 34 * 2**20 < capacity.map_bytes(sizes, needed, cpus=2) < 38 * 2**20


def test_a_file_is_never_given_less_room_than_it_may_need() -> None:
    """The early compile's estimate from the file's size: a generated rule takes at least
    40 bytes, so its maps cover the policy and the load takes them."""
    from bench import policies

    for suffix in (".yaml", ".json"):
        text = policies.policy_text(10_000, suffix)
        ir = pipeline.loads(text, f"p{suffix}").ir
        early = capacity.sizes_for(capacity.estimated_needs(len(text.encode())), environ={})
        wanted = capacity.sizes_for(capacity.needed_entries(ir), environ={})
        assert all(early[m] >= wanted[m] for m in wanted), (early, wanted)


def test_no_map_is_sized_beyond_what_the_kernel_holds_and_a_policy_beyond_it_is_refused() -> None:
    """bpf(2) refuses a hash map of more than 2^27 entries (E2BIG, measured on 6.18): the
    headroom gives way to the kernel's limit, and a policy that needs more is refused,
    as is an environment that asks for more connections than an LRU hash map holds."""
    limit = capacity.KERNEL_LIMITS["ISOEBPF_MAX_EXCEPTIONS"][0]
    assert capacity.sizes_for({"exceptions": limit - 5}, environ={})["ISOEBPF_MAX_EXCEPTIONS"] == limit
    needed = {"exceptions": limit + 1}
    environ = {"ISOEBPF_MAX_CONNECTIONS": 2**28}
    found = capacity.refusals(needed, capacity.sizes_for(needed, environ), environ=environ,
                              machine=ROOMY)
    assert found == [
        f"the policy needs {limit + 1} entries in map exceptions, and the kernel holds at most "
        f"{limit} entries in a hash map: simplify the policy",
        f"ISOEBPF_MAX_CONNECTIONS={2**28} in the environment asks for more entries than the kernel "
        f"holds in an LRU hash map ({2**27}): lower it"]


def test_a_bound_and_the_memory_are_named_together_with_what_each_allows() -> None:
    """Two environment bounds and a machine with 1 MiB to spare: one list, each limit once."""
    needed = {"classes_v4": 204, "allowed": 102, "counters": 122}
    environ = {"ISOEBPF_MAX_CLASSES": 150, "ISOEBPF_MAX_RULES": 64}
    tight = capacity.Machine(cpus=2, available=2**20, available_from="the test's cgroup", memlock=None)
    found = capacity.refusals(needed, capacity.sizes_for(needed, environ), environ=environ,
                              machine=tight)
    assert [f.split(",")[0] for f in found] == [
        "the policy needs 204 entries in map classes_v4", "the policy needs 122 rule ids (counters)",
        f"its maps need about {found[2].split('about ')[1].split(' ')[0]} MiB"]
    assert found[2].endswith("and the test's cgroup leaves 1 MiB")


def test_maps_taken_over_from_the_running_program_cost_no_new_memory() -> None:
    """A move to new maps shares the connection and fragment tables (program.SHARED_STATE)."""
    sizes = capacity.default_sizes()
    whole = capacity.map_bytes(sizes, {"classes_v4": 10}, cpus=2)
    shared = capacity.map_bytes(sizes, {"classes_v4": 10}, cpus=2, shared=("conntrack", "fragments"))
    connections = sizes["ISOEBPF_MAX_CONNECTIONS"] * (ctypes.sizeof(abi.FlowKey)
                                                      + ctypes.sizeof(abi.FlowEntry) + 64)
    fragments = sizes["ISOEBPF_MAX_FRAGMENTS"] * (ctypes.sizeof(abi.FragmentKey)
                                                  + ctypes.sizeof(abi.FragmentVerdict) + 64)
    assert whole - shared == connections + fragments


def cgroup_tree(root: Path, cgroup: str, levels: dict[str, dict[str, str]],
                meminfo_kib: int = 8 * 2**20) -> tuple[Path, Path]:
    """A /proc and a /sys/fs/cgroup of our own: `cgroup` is /proc/self/cgroup, `levels`
    each folder's files under the cgroup mount."""
    proc, cgroups = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kib} kB\n")
    for folder, files in levels.items():
        (cgroups / folder).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (cgroups / folder / name).write_text(text)
    return proc, cgroups


MIB = 2**20


def test_the_memory_there_is_is_the_least_any_memory_cgroup_up_the_tree_leaves(tmp_path: Path) -> None:
    """cgroup v2: the process's own group is unlimited, its parent is not; the page cache
    the kernel would reclaim (inactive_file) counts as room."""
    proc, cgroups = cgroup_tree(tmp_path, "0::/pods/web/app\n", {
        "pods/web/app": {"memory.max": "max\n", "memory.current": f"{50 * MIB}\n",
                         "memory.stat": "anon 1\ninactive_file 0\n"},
        "pods/web": {"memory.max": f"{300 * MIB}\n", "memory.current": f"{280 * MIB}\n",
                     "memory.stat": f"anon 1\ninactive_file {30 * MIB}\n"},
        "pods": {"memory.max": f"{4096 * MIB}\n", "memory.current": f"{1000 * MIB}\n",
                 "memory.stat": "inactive_file 0\n"},
    })
    assert capacity.available_memory(proc, cgroups) == (50 * MIB, "the memory cgroup /pods/web (memory.max)")


def test_cgroup_v1_limits_count_and_no_limit_leaves_the_machines_memory(tmp_path: Path) -> None:
    """cgroup v1 (memory.limit_in_bytes, as on this test machine), beside a v2 mount
    without the memory controller; a limit of "no limit" leaves MemAvailable."""
    v1 = {"memory/ci/job": {"memory.limit_in_bytes": f"{512 * MIB}\n",
                            "memory.usage_in_bytes": f"{500 * MIB}\n",
                            "memory.stat": f"cache 1\ntotal_inactive_file {4 * MIB}\n"},
          "memory/ci": {"memory.limit_in_bytes": "9223372036854771712\n",
                        "memory.usage_in_bytes": f"{900 * MIB}\n", "memory.stat": ""}}
    proc, cgroups = cgroup_tree(tmp_path / "limited", "4:memory:/ci/job\n0::/\n", v1)
    assert capacity.available_memory(proc, cgroups) == (16 * MIB, "the memory cgroup /ci/job "
                                                                  "(memory.limit_in_bytes)")
    proc, cgroups = cgroup_tree(tmp_path / "free", "4:memory:/ci\n0::/\n", v1, meminfo_kib=7 * 1024)
    assert capacity.available_memory(proc, cgroups) == (7 * MIB, "this machine's MemAvailable")
