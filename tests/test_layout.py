"""Who may import whom among the torch modules and the engine, read from the source (ast).

torchddp/store.py (the hosted TCPStore) and torchddp/codec.py (tensors through shared memory and CUDA
IPC) serve a launch and a long-lived world alike: they must not pull in the user API
(torchddp/ctx.py) or the launcher, nor torch before it is used. The engine never imports any of the
three: they register themselves with it."""
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
