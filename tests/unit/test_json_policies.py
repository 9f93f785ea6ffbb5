"""JSON policy files: the same policies, the same located errors, read fast."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import policies
from isoebpf import pipeline
from isoebpf.errors import PolicyError
from isoebpf.ir.tables import IR
from isoebpf.policy import jsonfile, parse
from isoebpf.policy.model import Policy
from tests.policygen import random_policy

ROOT = Path(__file__).resolve().parents[2]
SEED = (ROOT / "examples" / "it-hr.yaml").read_text()


def as_json(yaml_text: str, indent: int | None = 1) -> str:
    return json.dumps(yaml.safe_load(yaml_text), indent=indent)


def outcome(read: Any, text: str, path: str) -> Policy | list[str]:
    """The model, or every diagnostic as the CLI prints it."""
    try:
        policy: Policy = read(text, path)
    except PolicyError as err:
        return [str(d) for d in err.diagnostics]
    return policy


def tables(ir: IR) -> tuple[Any, ...]:
    """What an IR says, whatever lines of a file its rules came from."""
    return (ir.digest, ir.classes, ir.exceptions, ir.allowed, [(r.id, r.name, r.text) for r in ir.rules])


def without_places(policy: Policy) -> tuple[Any, ...]:
    """What a policy says, whatever file it came from."""
    return (policy.version, policy.default, policy.deny_action, policy.interfaces, policy.timeouts,
            [(o.name, o.subnets, o.isolated) for o in policy.overlays],
            [(e.src, e.dst) for e in policy.exceptions],
            [(r.src, r.dst, r.ports) for r in policy.rules])


@pytest.mark.parametrize(("path", "text", "json_read"), [
    ("policy.json", '{"version": 1}', True),
    ("policy.JSON", "version: 1\n", True),  # the extension decides: a YAML body is bad JSON
    ("policy.yaml", '{"version": 1}', False),
    ("policy.yml", '{"version": 1}', False),
    ("policy", '\n  {"version": 1}', True),
    ("/dev/stdin", "version: 1\n", False),
])
def test_json_is_chosen_by_extension_or_else_by_content(path: str, text: str, json_read: bool) -> None:
    assert jsonfile.is_json(text, path) is json_read


def test_the_seed_as_json_is_the_same_policy() -> None:
    text = as_json(SEED)
    from_json, from_yaml = pipeline.loads(text, "it-hr.json"), pipeline.loads(SEED, "it-hr.yaml")
    assert tables(from_json.ir) == tables(from_yaml.ir)
    assert without_places(from_json.policy) == without_places(from_yaml.policy)
    # Located in its own file: the rule's '{' on line 18 of the JSON as dumped.
    rule = from_json.policy.rules[0]
    line = text.splitlines()[rule.where.line - 1]
    assert line[rule.where.column - 1] == "{"


def test_random_policies_read_as_json_give_the_yaml_ir_and_what_the_checker_gives() -> None:
    """Through the fast path or not, a JSON file gives what the YAML checker gives for
    it (JSON is YAML), places included; and the IR of its YAML twin."""
    checked = 0

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        text = random_policy(rng).text
        for indent in (None, 2):
            json_text = as_json(text, indent)
            fast = outcome(jsonfile.loads, json_text, "p.json")
            assert fast == outcome(parse.loads, json_text, "p.json"), json_text
            if isinstance(fast, Policy):
                assert fast.warnings == outcome(parse.loads, json_text, "p.json").warnings  # type: ignore[union-attr]
                assert tables(pipeline.loads(json_text, "p.json").ir) == tables(pipeline.loads(text).ir)
                checked += 1

    check()
    assert checked >= 200


def broken(rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
    """`document` with one thing the contract refuses or warns about."""
    broken_doc = json.loads(json.dumps(document))
    overlay = rng.choice(list(broken_doc["overlays"]))
    choices = [
        lambda d: d.pop("version"),
        lambda d: d.update(version=True),
        lambda d: d.update(default="maybe"),
        lambda d: d.update(unknown=1),
        lambda d: d["overlays"][overlay].update(subnets=["10.250.1.5/16"]),
        lambda d: d["overlays"][overlay].update(isolated="yes"),
        lambda d: d["overlays"].update({"dcos-x": {"subnets": ["10.99.0.0/16"]}}),
        lambda d: d["overlays"][overlay]["subnets"].append(d["overlays"][overlay]["subnets"][0]),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": "203.0.113.0/24"}),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": overlay, "ports": []}),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": overlay, "ports": [80]}),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": overlay,
                                                    "ports": ["tcp/80", "tcp/80"]}),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": overlay,
                                                    "ports": ["any", "udp/53"]}),
        lambda d: d.setdefault("allow", []).append({"from": overlay}),
        lambda d: d.setdefault("exceptions", []).append({"from": overlay, "to": "nowhere"}),
        lambda d: d.update(interfaces=["a/b"]),
        lambda d: d.update(timeouts={"tcp": 0}),
    ]
    rng.choice(choices)(broken_doc)
    return broken_doc


def test_what_the_fast_path_cannot_vouch_for_gets_the_checkers_located_word() -> None:
    said = 0

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal said
        document = yaml.safe_load(random_policy(rng).text)
        json_text = json.dumps(broken(rng, document), indent=1)
        fast = outcome(jsonfile.loads, json_text, "p.json")
        slow = outcome(parse.loads, json_text, "p.json")
        assert fast == slow, json_text
        said += isinstance(fast, list) or bool(fast.warnings)

    check()
    assert said >= 100


def test_json_errors_are_located_in_the_json_file() -> None:
    text = '{\n "version": 1,\n "overlays": {"it": {"subnets": ["10.250.0.0./16"]}},\n "default": "maybe"\n}\n'
    with pytest.raises(PolicyError) as caught:
        pipeline.loads(text, "p.json")
    cidr, default = caught.value.diagnostics
    assert (cidr.message, default.message) == (
        "'10.250.0.0./16' is not a valid CIDR: remove the trailing dot ('10.250.0.0')",
        "default must be allow or deny, not 'maybe'")
    lines = text.splitlines()
    assert lines[cidr.line - 1][cidr.column - 1:].startswith('"10.250.0.0./16"')
    assert lines[default.line - 1][default.column - 1:].startswith('"maybe"')


@pytest.mark.parametrize(("text", "said"), [
    ('{"version": 1,\n "overlays": {,}}', "p.json:2:15: error: not valid JSON: Expecting property name "
                                          "enclosed in double quotes"),
    ('{"version": 1, "version": 1, "overlays": {"it": {"subnets": ["10.0.0.0/8"]}}}',
     "p.json:1:16: error: duplicate key 'version' in the policy (first at line 1)"),
    ("", "p.json:1:1: error: the policy file is empty"),
    ("[1, 2]", "p.json:1:1: error: the policy must be a mapping, not a list"),
])
def test_json_of_the_wrong_shape_is_refused_where_it_goes_wrong(text: str, said: str) -> None:
    with pytest.raises(PolicyError) as caught:
        pipeline.loads(text, "p.json")
    assert said in [str(d) for d in caught.value.diagnostics]


def test_a_generated_100k_rule_policy_reads_fast_as_json() -> None:
    rules = 100_000
    text = policies.policy_text(rules, ".json")
    policy = jsonfile.loads(text, "big.json")
    assert len(policy.rules) == rules and not policy.warnings
    last = policy.rules[-1]
    assert text.splitlines()[last.where.line - 1][last.where.column - 1] == "{"
