"""JSON policy files: the same policies as YAML, the same messages about the same values, read fast."""

from __future__ import annotations

import contextlib
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
BAD = ROOT / "tests" / "policies" / "bad"


def as_json(yaml_text: str, indent: int | None = 1) -> str:
    return json.dumps(yaml.safe_load(yaml_text), indent=indent)


def outcome(read: Any, text: str, path: str) -> Policy | list[str]:
    """The model, or every diagnostic as the CLI prints it."""
    try:
        policy: Policy = read(text, path)
    except PolicyError as err:
        return [str(d) for d in err.diagnostics]
    return policy


def said(text: str, path: str) -> list[tuple[int, int, str, str]]:
    """Every error and warning about a policy file: (line, column, severity, message)."""
    try:
        diagnostics = pipeline.parse_policy(text, path).warnings
    except PolicyError as err:
        diagnostics = tuple(err.diagnostics)
    return [(d.line, d.column, d.severity, d.message) for d in diagnostics]


def tables(ir: IR) -> tuple[Any, ...]:
    """What an IR says, whatever lines of a file its rules came from."""
    return (ir.digest, ir.classes, ir.exceptions, ir.allowed, [(r.id, r.name, r.text) for r in ir.rules])


def without_places(policy: Policy) -> tuple[Any, ...]:
    """What a policy says, whatever file it came from."""
    return (policy.version, policy.default, policy.deny_action, policy.interfaces, policy.timeouts,
            [(o.name, o.subnets, o.isolated) for o in policy.overlays],
            [(e.src, e.dst) for e in policy.exceptions],
            [(r.src, r.dst, r.ports) for r in policy.rules])


def json_value_at(text: str, line: int, column: int) -> Any:
    """The JSON value (or key) that starts at a place in `text`."""
    offset = sum(len(row) for row in text.splitlines(keepends=True)[:line - 1]) + column - 1
    return json.JSONDecoder().raw_decode(text, offset)[0]


def yaml_values_at(text: str, line: int, column: int) -> list[Any]:
    """The values of the YAML nodes (keys too) that start at a place in `text`: a block
    mapping starts where its first key does."""
    found: list[Any] = []
    pending = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while pending:
        node = pending.pop()
        if (node.start_mark.line + 1, node.start_mark.column + 1) == (line, column):
            found.append(yaml.constructor.SafeConstructor().construct_object(node, deep=True))
        if isinstance(node, yaml.MappingNode):
            pending += [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value
    return found


def assert_twins_say_the_same(yaml_text: str, json_text: str) -> list[str]:
    """A YAML file and its JSON twin: the same messages, each about the same value; the messages."""
    from_yaml, from_json = said(yaml_text, "p.yaml"), said(json_text, "p.json")
    assert [m[2:] for m in from_yaml] == [m[2:] for m in from_json], (from_yaml, from_json)
    for (yaml_line, yaml_column, _, message), (json_line, json_column, _, _) in zip(from_yaml, from_json, strict=True):
        there = json_value_at(json_text, json_line, json_column)
        assert there in yaml_values_at(yaml_text, yaml_line, yaml_column), (message, there)
    return [message for _, _, _, message in from_json]


@pytest.mark.parametrize(("path", "text", "json_read"), [
    ("policy.json", '{"version": 1}', True),
    ("policy.JSON", "version: 1\n", True),  # the extension decides: a YAML body is bad JSON
    ("policy.yaml", '{"version": 1}', False),
    ("policy.yml", '{"version": 1}', False),
    ("policy", '\n  {"version": 1}', True),
    ("policy.txt", '{"version": 1}', True),
    ("/dev/stdin", "version: 1\n", False),
    ("policy", "", False),
])
def test_json_is_chosen_by_extension_or_else_by_content(path: str, text: str, json_read: bool) -> None:
    assert jsonfile.is_json(text, path) is json_read


def test_a_file_is_read_by_its_name_or_its_first_character(tmp_path: Path) -> None:
    text = as_json(SEED)
    for name in ("it-hr.json", "it-hr"):
        (tmp_path / name).write_text(text)
        assert tables(pipeline.read(tmp_path / name).ir) == tables(pipeline.loads(SEED).ir)
    (tmp_path / "bad").write_text('{"version": 1,}')
    with pytest.raises(PolicyError, match="bad:1:15: error: not valid JSON: Expecting property name"):
        pipeline.read(tmp_path / "bad")


HAND_WRITTEN = {
    "the seed": SEED,
    "the contract's example": """\
version: 1
default: deny
deny_action: reject
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"]}
  lab: {subnets: [172.20.0.0/16], isolated: true}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: 192.168.5.0/24, to: 10.250.3.0/24}
  - {from: it, to: lab, ports: [udp/5000-5010, icmp, tcp/443]}
interfaces: ["veth*", "vxlan*"]
""",
    "timeouts, IPv6 and drop": """\
version: 1
deny_action: drop
overlays:
  a: {subnets: ["fd00:1::/32", 10.1.0.0/16]}
  b: {subnets: ["fd00:2::/32"], isolated: false}
allow:
  - {from: "fd00:1:2::/48", to: b, ports: [any]}
  - {from: 10.1.2.3, to: a}
timeouts: {tcp: 600, udp: 30}
""",
}


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_a_policy_as_json_is_the_same_policy(name: str) -> None:
    text = HAND_WRITTEN[name]
    for indent in (None, 2):
        from_json, from_yaml = pipeline.loads(as_json(text, indent), "p.json"), pipeline.loads(text, "p.yaml")
        assert tables(from_json.ir) == tables(from_yaml.ir)
        assert without_places(from_json.policy) == without_places(from_yaml.policy)


def test_the_places_the_model_keeps_are_in_the_json_file() -> None:
    text = as_json(HAND_WRITTEN["the contract's example"], 2)
    policy = pipeline.loads(text, "p.json").policy
    assert [json_value_at(text, o.where.line, o.where.column) for o in policy.overlays] == ["it", "hr", "lab"]
    entries = [*policy.exceptions, *policy.rules]
    assert [json_value_at(text, e.where.line, e.where.column) for e in entries] == \
        [yaml.safe_load(text)["exceptions"][0], *yaml.safe_load(text)["allow"]]


def test_random_policies_as_json_give_the_ir_of_their_yaml_and_what_yaml_reads_in_them() -> None:
    """A JSON file gives the IR of its YAML twin, and exactly what the YAML reader gives
    reading the JSON text itself (JSON is YAML): the same places and warnings."""
    checked = 0

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        text = random_policy(rng).text
        for indent in (None, 2):
            json_text = as_json(text, indent)
            from_json = outcome(jsonfile.loads, json_text, "p.json")
            assert from_json == outcome(parse.loads, json_text, "p.json"), json_text
            if isinstance(from_json, Policy):
                assert from_json.warnings == outcome(parse.loads, json_text, "p.json").warnings  # type: ignore[union-attr]
                assert tables(pipeline.loads(json_text, "p.json").ir) == tables(pipeline.loads(text).ir)
                checked += 1

    check()
    assert checked >= 150


def broken(rng: random.Random, document: dict[str, Any]) -> dict[str, Any]:
    """`document` with one or two things the contract refuses or warns about."""
    broken_doc: dict[str, Any] = json.loads(json.dumps(document))
    overlay = rng.choice(list(broken_doc["overlays"]))
    choices = [
        lambda d: d.pop("version"),
        lambda d: d.update(version=rng.choice([True, "1", 1.0, 2, None, [1]])),
        lambda d: d.update(default=rng.choice(["maybe", False, 0, 1.5, None, {"a": 1}])),
        lambda d: d.update(deny_action=rng.choice(["ignore", True, ["drop"]])),
        lambda d: d.update(unknown=1),
        lambda d: d.update(overlays=rng.choice([{}, [], "it", None])),
        lambda d: d["overlays"].update({rng.choice(["IT", "1st", "dcos-x", "mesos-y", "a" * 25]):
                                        {"subnets": ["10.99.0.0/16"]}}),
        lambda d: d["overlays"][overlay].update(subnets=[rng.choice(
            ["10.250.1.5/16", "010.1.0.0/16", "10.1.0.0./16", "::ffff:0:0/96", "10.0.0.0/33", True, 10, None])]),
        lambda d: d["overlays"][overlay].update(subnets=rng.choice([[], "10.0.0.0/8", None])),
        lambda d: d["overlays"][overlay].pop("subnets"),
        lambda d: d["overlays"][overlay].update(isolated=rng.choice(["yes", 1, None])),
        lambda d: d["overlays"][overlay].update(isolate=True),
        lambda d: d["overlays"].update(other={"subnets": d["overlays"][overlay]["subnets"][:1]}),
        lambda d: d["overlays"][overlay]["subnets"].append(d["overlays"][overlay]["subnets"][0]),
        lambda d: d.update(allow=rng.choice([{"from": overlay, "to": overlay}, "all", None])),
        lambda d: d.setdefault("allow", []).append(rng.choice(
            [{"from": overlay, "to": "203.0.113.0/24"}, {"from": "0.0.0.0/0", "to": overlay},
             {"from": overlay, "to": "nowhere"}, {"from": overlay, "to": overlay[:-1]},
             {"from": overlay, "to": True}, {"from": 5, "to": overlay}, {"from": overlay, "to": None},
             {"from": overlay}, {"to": overlay}, {"from": overlay, "to": overlay, "port": ["tcp/1"]},
             "a rule", [overlay, overlay]])),
        lambda d: d.setdefault("allow", []).append({"from": overlay, "to": overlay, "ports": rng.choice(
            [[], [80], [80.5], [True], ["tcp/80", "tcp/80"], ["any", "udp/53"], ["tcp/0"], ["udp/65536"],
             ["tcp/9-1"], ["sctp/1"], ["tcp/080"], "tcp/80", [["tcp/80"]]])}),
        lambda d: d.setdefault("exceptions", []).append(rng.choice(
            [{"from": overlay, "to": "nowhere"}, {"from": overlay, "to": overlay, "ports": ["tcp/1"]},
             {"from": overlay}, 7])),
        lambda d: d.update(interfaces=rng.choice([["a/b"], ["x" * 16], [5], "veth*"])),
        lambda d: d.update(timeouts=rng.choice([{"tcp": 0}, {"udp": "fast"}, {"icmp": 1.5}, {"tcp": True},
                                                {"tcpp": 5}, [5]])),
    ]
    rng.choice(choices)(broken_doc)
    if rng.random() < 0.3:
        with contextlib.suppress(KeyError, TypeError, AttributeError):  # the first break may be in its way
            rng.choice(choices)(broken_doc)
    return broken_doc


def test_broken_random_policies_say_the_same_of_the_same_values_in_json_and_yaml() -> None:
    """Broken JSON says exactly what the YAML reader says of the same text, and what its
    YAML twin says, each message about the same value."""
    errors = warnings = 0

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal errors, warnings
        document = broken(rng, yaml.safe_load(random_policy(rng).text))
        json_text = json.dumps(document, indent=rng.choice([None, 1]))
        assert outcome(jsonfile.loads, json_text, "p.json") == outcome(parse.loads, json_text, "p.json"), json_text
        yaml_text = yaml.safe_dump(document, sort_keys=False, default_flow_style=rng.choice([None, False]))
        messages = assert_twins_say_the_same(yaml_text, json_text)
        errors += any("warning" not in m for m in messages)
        warnings += bool(messages)

    check()
    assert errors >= 150 and warnings >= 150


# The bad-policy corpus, whose files' YAML alone can say what they are about.
YAML_ONLY = {
    "default-yaml-bool": "default: no, a YAML 1.1 boolean",
    "duplicate-overlay": "a repeated key: a JSON twin is written out below",
    "duplicate-top-key": "a repeated key: a JSON twin is written out below",
    "empty-file": "no document: JSON's is in the JSON-only cases",
    "merge-key": "anchors and merge keys",
    "not-yaml": "not YAML: JSON's is in the JSON-only cases",
    "deep-nesting": "JSON's nesting is bounded by Python's json module",
    "odd-tags": "YAML tags",
    "repeated-unknown-key": "a repeated key: a JSON twin is written out below",
}
CORPUS = [path for path in sorted(BAD.glob("*.yaml")) if path.stem not in YAML_ONLY]


def test_the_corpus_left_out_is_the_corpus() -> None:
    assert set(YAML_ONLY) <= {path.stem for path in BAD.glob("*.yaml")}
    assert len(CORPUS) >= 45


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_each_bad_policy_as_json_says_the_same_of_the_same_values(path: Path) -> None:
    text = path.read_text()
    messages = assert_twins_say_the_same(text, json.dumps(yaml.safe_load(text), indent=2))
    expected = [line.split(": error: ", 1)[1] for line in text.splitlines() if line.startswith("# expect: ")]
    assert [m for m in messages if m in expected] == expected


TWINS = {
    "a repeated top-level key": ("""\
version: 1
default: deny
overlays:
  it:
    subnets: [10.250.0.0/16]
default: allow
""", """\
{"version": 1,
 "default": "deny",
 "overlays": {
  "it": {
   "subnets": ["10.250.0.0/16"]}},
 "default": "allow"}
"""),
    "a repeated overlay": ("""\
version: 1
overlays:
  it:
    subnets: [10.250.0.0/16]
  it:
    subnets: [10.251.0.0/16]
""", """\
{"version": 1,
 "overlays": {
  "it": {
   "subnets": ["10.250.0.0/16"]},
  "it": {
   "subnets": ["10.251.0.0/16"]}}}
"""),
    "repeated keys in a rule, known and unknown": (
        "version: 1\noverlays: {it: {subnets: [10.250.0.0/16]}}\n"
        "allow: [{from: it, to: it, to: it, port: 1, port: 2}]\n",
        '{"version": 1,\n "overlays": {"it": {"subnets": ["10.250.0.0/16"]}},\n'
        ' "allow": [{"from": "it", "to": "it", "to": "it", "port": 1, "port": 2}]}\n'),
    "wrong types": (
        "version: 1\noverlays: {it: {subnets: [true, 10, null, [10.0.0.0/8], 10.250.0.0/16]}}\n"
        "allow: [{from: 5, to: true, ports: [80, 80.5, false, [tcp/1]]}, {from: null, to: {a: 1}}, [it], it]\n"
        "exceptions: {from: it, to: it}\ninterfaces: [7, veth*]\ntimeouts: {tcp: 1.5, udp: '60', icmp: true}\n",
        '{"version": 1, "overlays": {"it": {"subnets": [true, 10, null, ["10.0.0.0/8"], "10.250.0.0/16"]}},\n'
        ' "allow": [{"from": 5, "to": true, "ports": [80, 80.5, false, ["tcp/1"]]}, {"from": null, "to": {"a": 1}},'
        ' ["it"], "it"],\n "exceptions": {"from": "it", "to": "it"}, "interfaces": [7, "veth*"],\n'
        ' "timeouts": {"tcp": 1.5, "udp": "60", "icmp": true}}\n'),
    "scalars as written": (
        "version: 1.0\ndefault: false\ndeny_action: 1.50\noverlays: {it: {subnets: [10.250.0.0/16]}}\n",
        '{"version": 1.0, "default": false, "deny_action": 1.50,\n'
        ' "overlays": {"it": {"subnets": ["10.250.0.0/16"]}}}\n'),
    "the wrong containers": (
        "version: [1]\ndefault: {a: 1}\noverlays: [it]\n",
        '{"version": [1], "default": {"a": 1}, "overlays": ["it"]}\n'),
    "warnings": (
        "version: 1\ndefault: deny\noverlays:\n"
        "  it: {subnets: [10.250.0.0/16, 10.250.1.0/24]}\n"
        "  hr: {subnets: [192.168.0.0/16]}\n"
        "allow:\n  - {from: hr, to: it, ports: [tcp/80, tcp/80, any]}\n",
        '{"version": 1, "default": "deny", "overlays": {\n'
        '  "it": {"subnets": ["10.250.0.0/16", "10.250.1.0/24"]},\n'
        '  "hr": {"subnets": ["192.168.0.0/16"]}},\n'
        ' "allow": [\n  {"from": "hr", "to": "it", "ports": ["tcp/80", "tcp/80", "any"]}]}\n'),
}


@pytest.mark.parametrize("name", TWINS)
def test_yaml_and_json_twins_say_the_same_of_the_same_values(name: str) -> None:
    yaml_text, json_text = TWINS[name]
    assert json.loads(json_text) == yaml.safe_load(yaml_text) or "repeated" in name
    assert assert_twins_say_the_same(yaml_text, json_text)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"version": 1,\n "overlays": {,}}',
     ["p.json:2:15: error: not valid JSON: Expecting property name enclosed in double quotes"]),
    ('{"version": 1, "version": 1, "overlays": {"it": {"subnets": ["10.0.0.0/8"]}}}',
     ["p.json:1:16: error: duplicate key 'version' in the policy (first at line 1)"]),
    ('{"version": 1} {}', ["p.json:1:16: error: not valid JSON: Extra data"]),
    ('{"version": 1,\n "default": NaN}', ["p.json:2:13: error: not valid JSON: NaN is not a JSON value"]),
    ('{"version": 1, "timeouts": {"tcp": -Infinity}}',
     ["p.json:1:36: error: not valid JSON: -Infinity is not a JSON value"]),
    ('{"version": 1, "overlays": {"it": {"subnets": ["10.250.0.0/16"]}}, "allow": [{"from": "it"',
     ["p.json:1:91: error: not valid JSON: Expecting ',' delimiter"]),
    ("", ["p.json:1:1: error: the policy file is empty"]),
    (" \n\t\n", ["p.json:1:1: error: the policy file is empty"]),
    ("[1, 2]", ["p.json:1:1: error: the policy must be a mapping, not a list"]),
    ("null", ["p.json:1:1: error: the policy must be a mapping, not empty"]),
    ("{}", ["p.json:1:1: error: missing 'overlays': a policy needs at least one overlay",
            "p.json:1:1: error: missing 'version' (this tool reads 'version: 1')"]),
])
def test_json_of_the_wrong_shape_is_refused_where_it_goes_wrong(text: str, expected: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        pipeline.loads(text, "p.json")
    assert [str(d) for d in caught.value.diagnostics] == expected


def test_json_nested_beyond_what_python_reads_is_refused() -> None:
    with pytest.raises(PolicyError, match=r"p\.json:1:1: error: not valid JSON: maximum recursion depth"):
        pipeline.loads('{"version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "p.json")


def test_a_generated_100k_rule_policy_reads_as_json_and_its_errors_are_located() -> None:
    rules = 100_000
    text = policies.scaled_policy_json(rules)
    policy = jsonfile.loads(text, "big.json")
    assert len(policy.rules) == rules and not policy.warnings
    rows = text.splitlines()
    first, last = policy.rules[0], policy.rules[-1]
    assert rows[first.where.line - 1][first.where.column - 1:].startswith('{"from": "10.100.0.1", ')
    assert rows[last.where.line - 1][last.where.column - 1] == "{"
    assert last.where.line - first.where.line == rules - 1  # a line each
    # An error at the end is said where it is, at the same speed.
    port = text.rindex('"tcp/5201"')
    with pytest.raises(PolicyError) as caught:
        jsonfile.loads(text[:port] + '"tcp/0"' + text[port + len('"tcp/5201"'):], "big.json")
    where = next(n for n, row in enumerate(rows) if '"tcp/5201"' in row)
    assert [str(d) for d in caught.value.diagnostics] == [
        f"big.json:{where + 1}:{rows[where].index('tcp/5201')}: error: port 0 in 'tcp/0' is out of range (1-65535)"]
