"""Who may import whom among the torch modules and the engine, read from the source (ast).

torchddp/store.py (the hosted TCPStore) and torchddp/codec.py (tensors through shared memory and CUDA
IPC) serve a launch and a long-lived world alike: they must not pull in the user API
(torchddp/ctx.py) or the launcher, nor torch before it is used. The engine never imports any of the
three: they register themselves with it.

And the shape of the folders (issue 27): no module over 500 lines, each room of the engine a
subpackage that says what it is for, the engine's imports one way, the extension never through
the package init."""
from __future__ import annotations

import ast
from pathlib import Path

MPIFY = Path(__file__).resolve().parent.parent / "mpify"
TORCH_MODULES = {"mpify.torchddp.ctx", "mpify.torchddp.codec", "mpify.torchddp.store"}
LAUNCHER = ("mpify.engine.launch.ranch", "mpify.engine.launch.supervisor")  # ranch, and its Launch


def imported(tree: ast.AST) -> set[str]:
    """Every module an import in `tree` names: `import a.b` gives a.b, `from a import b` gives a and a.b."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_level(path: Path) -> ast.Module:
    """The module's statements outside any function (class bodies and if/try blocks included)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if hasattr(node, "body"):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stmts = getattr(node, field, None)
                if isinstance(stmts, list):
                    setattr(node, field, [s for s in stmts
                                          if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))])
    return tree


def test_store_and_codec_import_neither_the_api_nor_the_launcher_nor_torch():
    for name in ("store", "codec"):
        names = imported(module_level(MPIFY / "torchddp" / f"{name}.py"))
        bad = {n for n in names if n in ("mpify.torchddp.ctx", *LAUNCHER) or n.split(".")[0] == "torch"}
        assert not bad, f"mpify/torchddp/{name}.py imports {sorted(bad)} at module level"
        # anywhere at all (a function included), neither the user API nor the launcher
        anywhere = imported(ast.parse((MPIFY / "torchddp" / f"{name}.py").read_text()))
        assert not anywhere & {"mpify.torchddp.ctx", *LAUNCHER}, name


def test_engine_never_imports_the_torch_modules():
    for path in sorted((MPIFY / "engine").rglob("*.py")):
        names = imported(ast.parse(path.read_text()))
        assert not names & TORCH_MODULES, f"{path.relative_to(MPIFY)} imports {sorted(names & TORCH_MODULES)}"


def test_the_checker_sees_imports():
    # the walk above would pass vacuously on a parse that found nothing
    assert "mpify.torchddp.store.DEFAULT_TIMEOUT" in imported(ast.parse((MPIFY / "torchddp" / "ctx.py").read_text()))
    assert "mpify.engine.args.shm" in imported(module_level(MPIFY / "torchddp" / "codec.py"))
    assert "torch" in imported(ast.parse((MPIFY / "torchddp" / "codec.py").read_text()))
    assert "torch" not in imported(module_level(MPIFY / "torchddp" / "codec.py"))


def test_analysis_modules_are_small_and_import_only_the_analysis():
    # Issue 27: no analysis module over 500 lines, and the analysis is pure: it reads text and
    # imports none of the engine, the export room, the CLI, the extension or the `mpify` package
    # init (`import mpify`, `from mpify import x`, a relative import out of the package).
    paths = sorted((MPIFY / "analysis").rglob("*.py"))
    assert MPIFY / "analysis" / "slicer.py" in paths and MPIFY / "analysis" / "visitor.py" in paths
    long = {str(p.relative_to(MPIFY)): n for p in paths if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"analysis modules over 500 lines: {long}"
    seen = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        names = imported(tree)
        package = ["mpify"] + list(path.relative_to(MPIFY).parent.parts)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
                names |= {base} | {f"{base}.{a.name}" for a in node.names}
        bad = {n for n in names if n.split(".")[0] == "mpify" and n.split(".")[:2] != ["mpify", "analysis"]}
        assert not bad, f"{path.relative_to(MPIFY)} imports {sorted(bad)}: the analysis imports only itself"
        seen |= names
    # the walk would pass vacuously on a parse that found nothing
    assert {"mpify.analysis.visitor", "mpify.analysis.model", "ast"} <= seen


# Issue 27: the engine's folder shows its parts. Each room of mpify/engine is a subpackage whose
# __init__ says what it is for (and imports nothing, so importing one room loads no other); a
# room imports only the rooms below it in this order (and the shared modules), so the imports
# run one way. One exception: slurm/node.py is another node's main program, which runs the
# engine's own `ranch` and `World` there (slurm/agents.py, below launch and world, is what they
# use of Slurm).
ENGINE_ORDER = ("errors debug env rendezvous", "args", "messages", "rank", "output", "start", "slurm",
                "launch", "world")
ENGINE_LAYER = {part: i for i, parts in enumerate(ENGINE_ORDER) for part in parts.split()}
RUNS_THE_ENGINE = {"slurm/node.py"}  # may import launch and world (see above)
MAX_LINES = 500


def _engine_part(module: str) -> str | None:
    """`mpify.engine.launch.ranch` -> "launch"; `mpify.engine.errors` -> "errors"; else None."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["mpify", "engine"] and len(parts) > 2 else None


def test_no_module_over_500_lines():
    paths = [p for room in ("engine", "torchddp", "export", "cli") for p in (MPIFY / room).rglob("*.py")]
    paths.append(MPIFY / "extension.py")
    assert MPIFY / "engine" / "world" / "world.py" in paths and MPIFY / "torchddp" / "ctx.py" in paths
    long = {str(p.relative_to(MPIFY)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_each_room_of_the_engine_says_what_it_is_for_and_imports_nothing():
    rooms = sorted({p.parent for p in (MPIFY / "engine").rglob("*.py")} | {MPIFY / "torchddp"})
    assert {MPIFY / "engine" / room for room in ("args", "rank", "output", "start", "launch", "world", "slurm")} \
        <= set(rooms)
    for room in rooms:
        init = room / "__init__.py"
        assert init.exists(), f"{room.relative_to(MPIFY)} has no __init__.py"
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(MPIFY)} has no docstring"
        assert not imported(tree), f"{init.relative_to(MPIFY)} imports {sorted(imported(tree))}"
    for part in ENGINE_LAYER:  # the order names every room and shared module there is, and nothing else
        assert (MPIFY / "engine" / part).is_dir() or (MPIFY / "engine" / f"{part}.py").is_file(), part
    assert {p.stem if p.is_file() else p.name for p in (MPIFY / "engine").iterdir()
            if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())} == set(ENGINE_LAYER)


def test_the_engine_imports_only_itself_one_way():
    checked = 0
    for path in sorted((MPIFY / "engine").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(MPIFY / "engine"))
        if where == "__init__.py":
            continue  # imports nothing (the test above)
        assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree)), \
            f"engine/{where}: a relative import (write the module's full name)"
        names = imported(tree)
        # none of the torch part, the analysis, the exporter, the CLI, the extension, nor `mpify`
        # itself (`import mpify`, `from mpify import x`: the package init, the public surface)
        outside = {n for n in names if n.split(".")[0] == "mpify" and _engine_part(n) is None and n != "mpify.engine"}
        assert not outside, f"engine/{where} imports {sorted(outside)}: the engine imports only itself"
        mine = ENGINE_LAYER[where.split("/")[0].removesuffix(".py")]
        above = {n for n in names if (part := _engine_part(n)) is not None and ENGINE_LAYER[part] > mine}
        if where in RUNS_THE_ENGINE:
            above = {n for n in above if _engine_part(n) not in ("launch", "world")}
        assert not above, f"engine/{where} imports {sorted(above)}, from rooms above its own (ENGINE_ORDER)"
        checked += bool(names)
    assert checked > 30


def test_the_extension_goes_through_no_package_init():
    # It imports the modules it uses (World, run_source) and those whose import registers torch's
    # parts with the engine, never `mpify` (the public surface, whose init loads every room).
    tree = ast.parse((MPIFY / "extension.py").read_text())
    names = imported(tree)
    assert "mpify" not in names, "mpify/extension.py imports from `mpify` (the package init)"
    assert {"mpify.engine.world.world.World", "mpify.torchddp.ctx", "mpify.torchddp.codec"} <= names
