"""The house's floors, read from the code's own imports (every `import`, lazy ones included).

`moe_parallel/`'s sub-packages import only those below them, the top-level packages likewise,
no file imports itself back through others, and docs/architecture.md draws the same floors and
names every file of `moe_parallel/` in its file table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top floor first; a set is one floor (no imports between its members)
PACKAGES = ["bench", "deployments", {"engine", "cluster"}, "moe_parallel"]
SUBPACKAGES = ["parallel", "loading", "step", "sampling", "model", {"runtime", "native", "contract"}]


def _floors(order) -> dict[str, int]:
    out = {}
    for i, floor in enumerate(reversed(order)):
        for name in {floor} if isinstance(floor, str) else floor:
            out[name] = i
    return out


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of this project that `path` imports (names taken from a package count as
    that package's modules where such a file exists)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in _flat(PACKAGES) and _exists(m)}


def _flat(order) -> set[str]:
    return set().union(*({f} if isinstance(f, str) else f for f in order))


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _files() -> list[Path]:
    return sorted(p for top in _flat(PACKAGES) for p in (ROOT / top).rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in _files()}


def _unit(module: str) -> tuple[str, str | None]:
    parts = module.split(".")
    sub = parts[1] if parts[0] == "moe_parallel" and len(parts) > 1 else None
    return parts[0], sub


def test_no_import_runs_up_a_floor():
    top, sub = _floors(PACKAGES), _floors(SUBPACKAGES)
    wrong = []
    for src, targets in _graph().items():
        (sp, ss) = _unit(src)
        for dst in targets:
            (dp, ds) = _unit(dst)
            if sp != dp:
                if top[sp] <= top[dp]:
                    wrong.append(f"{src} -> {dst}")
            elif sp == "moe_parallel" and ss and ds and ss != ds and sub[ss] <= sub[ds]:
                wrong.append(f"{src} -> {dst}")
    assert not wrong, "imports that run up (or sideways on one floor):\n" + "\n".join(sorted(wrong))


def test_no_circle_of_imports():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            nxt = nxt if nxt in graph else nxt.rpartition(".")[0]
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    # a package's __init__ importing its own modules is no circle
    circles = [c for c in circles if not all(m.startswith(c.split(" -> ")[0]) for m in c.split(" -> "))]
    assert not circles, "\n".join(circles)


def _doc() -> str:
    return (ROOT / "docs" / "architecture.md").read_text()


def test_the_picture_draws_these_floors():
    doc = _doc()
    block = doc.split("Sub-packages by subsystem", 1)[1].split("```", 2)[1]
    floors = []
    for line in block.strip().splitlines():
        names = set()
        for word in line.split():  # the names in front of the caption
            if not word.endswith(("/", ".py")):
                break
            names.add(word.removesuffix("/").removesuffix(".py"))
        floors.append(names)
    assert floors == [f if isinstance(f, set) else {f} for f in SUBPACKAGES]


def test_the_file_table_names_every_file():
    doc = _doc()
    named = set(re.findall(r"^\| `([\w/.]+)` \|", doc, re.M))
    files = {p.relative_to(ROOT / "moe_parallel").as_posix() for p in (ROOT / "moe_parallel").rglob("*.py")
             if p.name != "__init__.py" and "native" not in p.parts}
    assert files <= named, f"missing from docs/architecture.md's file table: {sorted(files - named)}"
    assert {"native/", "native/csrc/"} <= named
    gone = {n for n in named if n.endswith(".py") and "/" in n and not (ROOT / "moe_parallel" / n).exists()}
    assert not gone, f"named in the file table but not in moe_parallel/: {sorted(gone)}"
