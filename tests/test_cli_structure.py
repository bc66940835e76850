"""The CLI's modules import one another one way: app -> commands -> the command modules (-> common),
and app -> coercion (its option converters).

Read from the source, as a reviewer would: every `import mpify.cli.X` / `from mpify.cli[.X] import`
in each module of mpify/cli, at any depth (a function-level import counts too)."""
from __future__ import annotations

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "mpify" / "cli"


def cli_imports() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(CLI.glob("*.py")):
        mod = path.stem
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {n.split(".")[2] for n in names if n.startswith("mpify.cli.") and n.count(".") >= 2}
        graph[mod] = edges & {p.stem for p in CLI.glob("*.py")}
    return graph


def test_cli_imports_run_one_way():
    graph = cli_imports()
    assert graph["app"] == {"commands", "coercion"}
    assert graph["commands"] == {"deps", "run", "export"}
    for mod in ("deps", "run", "export", "common", "coercion", "__init__"):
        assert not graph[mod] & {"app", "commands"}, f"{mod} imports {graph[mod]}"
    # no cycle at all: a topological order exists
    order, left = [], dict(graph)
    while left:
        ready = [m for m, deps in left.items() if not deps - set(order)]
        assert ready, f"import cycle among {sorted(left)}"
        order += sorted(ready)
        for m in ready:
            del left[m]


def test_app_registers_every_command():
    import typer

    from mpify.cli.app import app

    assert sorted(typer.main.get_command(app).commands) == ["deps", "export", "run"]
