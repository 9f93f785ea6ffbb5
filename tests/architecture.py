"""The package's import graph, read with `ast`, and the stages it must keep to.

tests/unit/test_architecture.py checks the graph against STAGES; run as
`python -m tests.architecture DIR` it writes the picture of docs/architecture.md
(DIR/architecture.dot, and .svg where Graphviz is installed): `make architecture`.
"""

from __future__ import annotations

import ast
import itertools
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CONTROL = Path(__file__).resolve().parents[1] / "control"
PACKAGE = "isoebpf"


@dataclass(frozen=True)
class Stage:
    name: str
    rooms: tuple[str, ...]  # module names or package prefixes
    apart: bool = False  # rooms side by side: none imports another


# Bottom to top. A module imports only modules of its own stage or of stages below.
STAGES = (
    Stage("ground", ("isoebpf", "isoebpf.errors", "isoebpf.resource")),
    Stage("policy", ("isoebpf.policy",)),
    Stage("ir", ("isoebpf.ir",)),
    Stage("pipeline", ("isoebpf.pipeline",)),
    Stage("cluster", ("isoebpf.cluster",)),
    Stage("backends: shared floor", ("isoebpf.backends", "isoebpf.backends.interface",
                                     "isoebpf.backends.state", "isoebpf.backends.counts",
                                     "isoebpf.backends.links", "isoebpf.backends.docker_user")),
    Stage("backends", ("isoebpf.backends.ebpf", "isoebpf.backends.iptables"), apart=True),
    Stage("backends: top floor", ("isoebpf.backends.registry", "isoebpf.backends.enforcer")),
    Stage("service", ("isoebpf.service",)),
    Stage("cli", ("isoebpf.cli",)),
    Stage("lab", ("isoebpf.lab",)),
)

# Third-party packages only some rooms may import.
CONFINED = {"bcc": ("isoebpf.backends",), "pyroute2": ("isoebpf.backends",), "click": ("isoebpf.cli",),
            "etcd3gw": ("isoebpf.cluster.etcd",), "requests": ("isoebpf.cluster.etcd",)}

Graph = dict[str, set[str]]


def modules(root: Path = CONTROL) -> dict[str, Path]:
    """Module name -> file, for every module of the package under `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """Every module `name` imports, ours by their module name, others by their top name;
    imports inside functions too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name if alias.name.startswith(PACKAGE) else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith(PACKAGE):
                yield target.split(".")[0]
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                yield sub if sub in known else target


def graph(root: Path = CONTROL) -> tuple[Graph, dict[str, set[str]]]:
    """(our module -> our modules it imports, our module -> third-party packages it imports)."""
    known = modules(root)
    ours: Graph = {}
    others: dict[str, set[str]] = {}
    for name, path in known.items():
        imported = set(_imports(name, path, known)) - {name, "__future__"}
        ours[name] = {m for m in imported if m in known}
        others[name] = {m for m in imported if not m.startswith(PACKAGE)}
    return ours, others


def room_of(module: str) -> tuple[int, str]:
    """(stage index, room) of a module: the longest room name it is, or lies in."""
    best: tuple[int, str] | None = None
    for index, stage in enumerate(STAGES):
        for room in stage.rooms:
            if (module == room or module.startswith(room + ".")) and (
                    best is None or len(room) > len(best[1])):
                best = (index, room)
    if best is None:
        raise KeyError(f"{module} lies in no stage: add it to tests/architecture.py STAGES")
    return best


def upward(ours: Graph) -> list[str]:
    """Imports that climb to a later stage, or cross between rooms kept apart."""
    found = []
    for module, imported in sorted(ours.items()):
        stage, room = room_of(module)
        for target in sorted(imported):
            target_stage, target_room = room_of(target)
            if target_stage > stage:
                found.append(f"{module} ({STAGES[stage].name}) imports {target} "
                             f"({STAGES[target_stage].name}), a later stage")
            elif target_stage == stage and STAGES[stage].apart and target_room != room:
                found.append(f"{module} imports {target}: {room} and {target_room} stand apart")
    return found


def circles(ours: Graph) -> list[list[str]]:
    """Every set of modules that import each other in a loop (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(ours[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in ours[module]:
                found.append(sorted(component))

    for module in sorted(ours):
        if module not in index:
            visit(module)
    return found


def confined(others: Mapping[str, set[str]]) -> list[str]:
    """Third-party imports outside the rooms allowed them."""
    return [f"{module} imports {package}, which only {' and '.join(allowed)} may import"
            for module, imported in sorted(others.items())
            for package, allowed in CONFINED.items()
            if package in imported and not module.startswith(allowed)]


def dot(ours: Graph, root: Path = CONTROL) -> str:
    """The rooms and the imports between them in Graphviz's language, a band per stage,
    the top stage on top. Every room may use the ground (errors, resource): those
    arrows are left out, so that the rest can be read; so are package faces
    (an __init__ that only says what its package holds)."""
    faces = {name for name, path in modules(root).items() if path.name == "__init__.py"}
    rooms: dict[str, list[str]] = {}
    for module in sorted(ours):
        if module not in faces:
            rooms.setdefault(room_of(module)[1], []).append(module)
    arrows = sorted({(room_of(m)[1], room_of(t)[1]) for m in ours for t in ours[m]
                     if room_of(t)[0] > 0 and room_of(m)[1] != room_of(t)[1]})
    lines = ["digraph isoebpf {", "  newrank=true; ranksep=0.45; nodesep=0.3;",
             '  node [shape=box, style="rounded,filled", fillcolor="#f4f6fa", fontname="sans", '
             'fontsize=10]; edge [color="#667788", arrowsize=0.6];']
    bands = []
    for number in reversed(range(len(STAGES))):
        stage = STAGES[number]
        members = [f'"{r}"' for r in stage.rooms if r in rooms]
        bands.append(members[0])
        lines.append(f'  subgraph cluster_{number} {{ label="{stage.name}"; labeljust=l; '
                     'fontname="sans"; fontsize=11; style=dashed; color="#aaaaaa";')
        for room in (r for r in stage.rooms if r in rooms):
            inside = [m.removeprefix(room + ".") for m in rooms[room] if m != room]
            title = room.removeprefix(PACKAGE + ".")
            label = f"{title}/\\n{' '.join(inside)}" if inside else title
            lines.append(f'    "{room}" [label="{label}"];')
        lines.append(f"    {{ rank=same; {'; '.join(members)}; }}")
        lines.append("  }")
    # Invisible arrows stack the bands in stage order, whatever imports what.
    lines += [f"  {upper} -> {lower} [style=invis];" for upper, lower in itertools.pairwise(bands)]
    lines += [f'  "{room}" -> "{target}";' for room, target in arrows]
    return "\n".join([*lines, "}"]) + "\n"


def main(out: Path) -> None:
    ours, _ = graph()
    out.mkdir(parents=True, exist_ok=True)
    (out / "architecture.dot").write_text(dot(ours), encoding="utf-8")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", str(out / "architecture.svg"),
                        str(out / "architecture.dot")], check=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
