"""What a star import supplies, found by reading the module's source (nothing is imported or run).

Why: course notebooks get `torch`, `nn`, `tensor` and `Path` from `from fastai.vision.all import *`
or from a helper module beside the notebook (`from utils import *`). Without knowing what those
names are, every `torch.stack(..)` had to be read as "may change `torch`" (issue 11). Here
`from X import *` is answered the way Python would answer it, statically:

- X's file is found beside the notebook first (a helper module), then where mpify runs, with
  `importlib.util.find_spec` for the top-level package only (finding `a.b` through find_spec would
  import `a`, running its code) and the file system below it.
- The file is parsed; if it sets `__all__` from string literals, that is the list; otherwise every
  public top-level binding is supplied, imported modules included (fastai's `from torch import *`
  style modules hand out `torch` and `np` this way). Its own star imports are followed, a few levels
  deep (`MAX_DEPTH`).
- Each supplied name is 'module' (bound by `import`) or 'object' (anything else: a class, a
  function, a constant).
- `complete` says whether the list is all there is. It is not when the module builds `__all__` in a
  loop (`torch`), defines a module `__getattr__`, or star-imports something without source (a
  C extension); names outside the list may then still come from it, and the slicer stays
  conservative for them.

Parsed modules are cached per file and modification time, so a notebook with many star imports of
one library reads each file once per process.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from dataclasses import dataclass, field

__all__ = ["StarExports", "resolve_star", "MAX_DEPTH"]

# fastai.vision.all -> fastai.basics -> fastai.data.all -> fastai.torch_basics -> fastai.imports
# -> fastcore.all -> fastcore.imports: seven levels in the deepest course library we know.
MAX_DEPTH = 8


@dataclass
class StarExports:
    """module: the dotted name as written; found: its source was read; names: name -> 'module' |
    'object'; complete: no other name can come from it; path: the file read (None if not found)."""

    module: str
    found: bool
    names: dict = field(default_factory=dict)
    complete: bool = False
    path: str | None = None


@dataclass
class _ModuleFacts:
    """The star-relevant facts of one parsed file (cached by path and mtime)."""

    bindings: dict  # public and private top-level names -> 'module' | 'object'
    all_names: list | None  # `__all__` when it is built from literals, else None
    all_dynamic: bool  # `__all__` is changed by something that is not a literal
    dynamic: bool  # module `__getattr__`, `globals().update(..)`: names beyond the bindings
    stars: list  # (module, level) of its own star imports, in order


_FACTS_CACHE: dict = {}  # (path, mtime) -> _ModuleFacts
_FIND_CACHE: dict = {}  # (dotted, search_dir) -> (path, is_package) | None
# (module, level, search_dir, package) -> (StarExports, [(file read, its mtime)]): valid while
# none of the files it read changed.
_RESOLVE_CACHE: dict = {}


def resolve_star(module: str, level: int = 0, search_dir: str | None = None,
                 package: str | None = None) -> StarExports:
    """What `from <level dots><module> import *` supplies. `search_dir`: the notebook's directory,
    searched first (a helper module beside the notebook). `package`: for relative imports, the
    package the importing file belongs to (None at notebook level)."""
    key = (module, level, search_dir, package)
    hit = _RESOLVE_CACHE.get(key)
    if hit is not None and all(_mtime(p) == m for p, m in hit[1]):
        return hit[0]
    read: list = []
    exp = _resolve(module, level, search_dir, package, 0, frozenset(), read)
    _RESOLVE_CACHE[key] = (exp, [(p, _mtime(p)) for p in read])
    return exp


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _resolve(module, level, search_dir, package, depth, seen, read) -> StarExports:
    name = _absolute(module, level, package)
    shown = "." * level + (module or "")
    if name is None:
        return StarExports(shown, False)
    found = _find(name, search_dir)
    if found is None:
        return StarExports(shown, False)
    path, is_pkg = found
    read.append(path)
    if path in seen:
        # A cycle (`from pkg import *` inside one of pkg's own modules): Python hands out what the
        # partly initialised module has bound so far, names this walk already collects.
        return StarExports(shown, True, {}, True, path)
    if depth >= MAX_DEPTH:
        return StarExports(shown, True, {}, False, path)  # deeper than we read: may supply more
    facts = _facts(path)
    if facts is None:
        return StarExports(shown, False, {}, False, path)
    own_pkg = name if is_pkg else name.rpartition(".")[0]
    complete = not facts.dynamic
    supplied: dict = {}
    for mod, lvl in facts.stars:
        sub = _resolve(mod, lvl, search_dir, own_pkg, depth + 1, seen | {path}, read)
        complete = complete and sub.found and sub.complete
        supplied.update(sub.names)
    supplied.update(facts.bindings)
    if facts.all_names is not None:
        names = {n: supplied.get(n, "object") for n in facts.all_names}
        complete = not facts.all_dynamic
    else:
        names = {n: k for n, k in supplied.items() if not n.startswith("_")}
        complete = complete and not facts.all_dynamic
    return StarExports(shown, True, names, complete, path)


def _absolute(module, level, package) -> str | None:
    if not level:
        return module or None
    if not package:
        return None  # a relative star import at notebook level: nothing to be relative to
    base = package.split(".")
    if level - 1 > len(base) - 1:
        return None
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _find(name: str, search_dir: str | None):
    """(path of the .py file, is a package) for dotted `name`, or None. Never imports anything."""
    key = (name, search_dir)
    if key in _FIND_CACHE:
        return _FIND_CACHE[key]
    parts = name.split(".")
    dirs: list = []
    out = None
    if search_dir:
        out = _in_dirs(parts[0], [search_dir])
    if out is None:
        try:
            spec = importlib.util.find_spec(parts[0])  # top level only: runs no package code
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            if spec.submodule_search_locations:
                init = spec.origin if spec.origin and spec.origin.endswith(".py") else None
                out = (init, True, list(spec.submodule_search_locations))
            elif spec.origin and spec.origin.endswith(".py"):
                out = (spec.origin, False, [])
    if out is not None:
        for part in parts[1:]:
            path, is_pkg, dirs = out
            if not is_pkg:
                out = None
                break
            out = _in_dirs(part, dirs)
            if out is None:
                break
    result = None
    if out is not None and out[0] is not None:
        result = (out[0], out[1])
    _FIND_CACHE[key] = result
    return result


def _in_dirs(part: str, dirs):
    """(file, is_package, search dirs) for `part` as a module or package in one of `dirs`."""
    for d in dirs:
        pkg = os.path.join(d, part)
        init = os.path.join(pkg, "__init__.py")
        if os.path.isfile(init):
            return (init, True, [pkg])
        if os.path.isfile(pkg + ".py"):
            return (pkg + ".py", False, [])
        if os.path.isdir(pkg) and not any(f.endswith((".so", ".pyd")) and f.startswith(part + ".")
                                          for f in os.listdir(d)):
            return (None, True, [pkg])  # a namespace package: no file of its own
    return None


def _facts(path: str) -> _ModuleFacts | None:
    try:
        key = (path, os.stat(path).st_mtime_ns)
    except OSError:
        return None
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        _FACTS_CACHE[key] = None
        return None
    facts = _ModuleFacts({}, None, False, False, [])
    _scan(tree.body, facts, top=True)
    _FACTS_CACHE[key] = facts
    return facts


def _scan(body, facts: _ModuleFacts, top: bool) -> None:
    """Top-level bindings, `__all__` and star imports, looking into if/try/with blocks (optional
    imports live there) but not into functions or classes. `top`: not inside a loop."""
    for node in body:
        if isinstance(node, ast.Import):
            for a in node.names:
                facts.bindings[a.asname or a.name.split(".")[0]] = "module"
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name == "*":
                    facts.stars.append((node.module or "", node.level or 0))
                else:
                    facts.bindings[a.asname or a.name] = "object"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            facts.bindings[node.name] = "object"
            if node.name == "__getattr__":
                facts.dynamic = True  # PEP 562: any name may come from it
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        if n.id == "__all__":
                            _all_assign(node, facts, top)
                        else:
                            facts.bindings[n.id] = "object"
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            _all_call(node.value, facts, top)
        elif isinstance(node, (ast.For, ast.While)):
            _scan(node.body + node.orelse, facts, top=False)
        elif isinstance(node, (ast.If, ast.With, ast.Try)) or type(node).__name__ == "TryStar":
            for f in ("body", "orelse", "finalbody"):
                _scan(getattr(node, f, []), facts, top)
            for h in getattr(node, "handlers", []):
                _scan(h.body, facts, top)


def _literal_strings(node) -> list | None:
    if isinstance(node, (ast.List, ast.Tuple)) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


def _all_assign(node, facts: _ModuleFacts, top: bool) -> None:
    value = _literal_strings(node.value) if node.value is not None else None
    if value is None or not top:
        facts.all_dynamic = True  # `__all__ = other.__all__ + [..]`, or built in a loop
        if facts.all_names is None:
            facts.all_names = []
        return
    if isinstance(node, ast.AugAssign):
        facts.all_names = (facts.all_names or []) + value
    else:
        facts.all_names = value


def _all_call(call: ast.Call, facts: _ModuleFacts, top: bool) -> None:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "__all__":
        arg = call.args[0] if call.args else None
        if f.attr == "append" and isinstance(arg, ast.Constant) and isinstance(arg.value, str) and top:
            facts.all_names = (facts.all_names or []) + [arg.value]
        elif f.attr == "extend" and arg is not None and _literal_strings(arg) is not None and top:
            facts.all_names = (facts.all_names or []) + _literal_strings(arg)
        else:
            facts.all_dynamic = True
    elif isinstance(f, ast.Attribute) and f.attr == "update" and isinstance(f.value, ast.Call) \
            and isinstance(f.value.func, ast.Name) and f.value.func.id == "globals":
        facts.dynamic = True  # `globals().update(..)` binds names no parser can see
