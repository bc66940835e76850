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
  style modules hand out `torch` and `np` this way). Its own star imports are followed, up to
  `MAX_DEPTH` levels deep.
- Each supplied name is 'module' (bound by `import`) or 'object' (anything else: a class, a
  function, a constant).
- `complete` says whether the list is all there is. It is not when the module builds `__all__` in a
  loop (`torch`), defines a module `__getattr__`, or star-imports something without source (a
  C extension); names outside the list may then still come from it, and the slicer stays
  conservative for them.

Each file's facts are cached by path, size and modification time, in this process and on disk
(`diskcache.py`: a library's sixty files are parsed once, not in every `mpify export`). The walk
over a library's star imports is a graph with many paths to the same module (every fastai module
star-imports `fastai.torch_basics`); each module's result is computed once per walk and reused
wherever the cycle and depth cut-offs below cannot make it differ (`_Memo`), which took
`fastai.vision.all` from 34,000 visits to a few hundred.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from dataclasses import dataclass, field, replace

from mpify.analysis.diskcache import DiskCache

__all__ = ["StarExports", "resolve_star", "MAX_DEPTH"]

# fastai.vision.all -> fastai.basics -> fastai.data.all -> fastai.torch_basics -> fastai.imports
# -> fastcore.all -> fastcore.imports: seven levels in the deepest course library we know, and
# fastcore's own modules go on below that. The limit was 8 while every path was walked afresh
# (34,000 visits for fastai.vision.all, with the same names as a walk without the limit); with
# each module's result reused (`_Memo`) the walk is a few hundred visits, and the limit is only a
# guard against a pathological chain.
MAX_DEPTH = 32


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

    def to_json(self) -> list:
        return [self.bindings, self.all_names, self.all_dynamic, self.dynamic, self.stars]

    @classmethod
    def from_json(cls, value) -> "_ModuleFacts":
        """Facts read back from the disk cache, checked field by field (a cache file is never
        trusted: anything off raises ValueError and the file is parsed instead)."""
        if not (isinstance(value, list) and len(value) == 5):
            raise ValueError("not a facts entry")
        bindings, all_names, all_dynamic, dynamic, stars = value
        if not (isinstance(bindings, dict) and all(isinstance(k, str) and v in ("module", "object")
                                                   for k, v in bindings.items())):
            raise ValueError("bindings")
        if all_names is not None and not (isinstance(all_names, list)
                                          and all(isinstance(n, str) for n in all_names)):
            raise ValueError("__all__")
        if type(all_dynamic) is not bool or type(dynamic) is not bool:
            raise ValueError("flags")
        if not (isinstance(stars, list) and all(isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)
                                                and type(x[1]) is int for x in stars)):
            raise ValueError("star imports")
        return cls(bindings, all_names, all_dynamic, dynamic, [tuple(x) for x in stars])


@dataclass
class _Memo:
    """A module's result within one walk, and when it may be reused. A walk cuts at a file already
    on its path (a cycle) and below MAX_DEPTH, so a result is the same elsewhere only if none of
    the files it read is on the other path (`touched`) and the other depth plus `height` (how far
    below the module the walk went) stays above the cut."""

    exports: StarExports
    touched: frozenset
    height: int


_FACTS_CACHE: dict = {}  # (path, size, mtime) -> _ModuleFacts | None
_DISK = DiskCache("stars-v1.json")  # path -> [size, mtime_ns, _ModuleFacts.to_json() or None]
_FIND_CACHE: dict = {}  # (dotted, search_dir) -> (path, is_package) | None
# (module, level, search_dir, package) -> (StarExports, [(file read, its (size, mtime))]): valid
# while none of the files it read changed.
_RESOLVE_CACHE: dict = {}


def resolve_star(module: str, level: int = 0, search_dir: str | None = None,
                 package: str | None = None) -> StarExports:
    """What `from <level dots><module> import *` supplies. `search_dir`: the notebook's directory,
    searched first (a helper module beside the notebook). `package`: for relative imports, the
    package the importing file belongs to (None at notebook level)."""
    key = (module, level, search_dir, package)
    hit = _RESOLVE_CACHE.get(key)
    if hit is not None and all(_stamp(p) == m for p, m in hit[1]):
        return hit[0]
    try:
        exp, touched, _ = _resolve(module, level, search_dir, package, 0, frozenset(), {})
    finally:
        _DISK.flush()
    _RESOLVE_CACHE[key] = (exp, [(p, _stamp(p)) for p in touched])
    return exp


def _stamp(path):
    """(size, mtime) of a file: what says it is the version read before."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _resolve(module, level, search_dir, package, depth, seen, memo) -> tuple:
    """(StarExports, files read, height) of `from <level dots><module> import *` reached at `depth`
    below the notebook with the files of `seen` on the path. memo: path -> _Memo, for this walk."""
    name = _absolute(module, level, package)
    shown = "." * level + (module or "")
    if name is None:
        return StarExports(shown, False), frozenset(), 0
    found = _find(name, search_dir)
    if found is None:
        return StarExports(shown, False), frozenset(), 0
    path, is_pkg = found
    if path in seen:
        # A cycle (`from pkg import *` inside one of pkg's own modules): Python hands out what the
        # partly initialised module has bound so far, names this walk already collects.
        return StarExports(shown, True, {}, True, path), frozenset({path}), 0
    if depth >= MAX_DEPTH:  # deeper than we read: may supply more
        return StarExports(shown, True, {}, False, path), frozenset({path}), 0
    m = memo.get(path)
    if m is not None and not (m.touched & seen) and depth + m.height < MAX_DEPTH:
        return replace(m.exports, module=shown), m.touched, m.height
    facts = _facts(path)
    if facts is None:
        return StarExports(shown, False, {}, False, path), frozenset({path}), 0
    own_pkg = name if is_pkg else name.rpartition(".")[0]
    complete = not facts.dynamic
    supplied: dict = {}
    touched, height = {path}, 0
    inner = seen | {path}
    for mod, lvl in facts.stars:
        sub, sub_touched, sub_height = _resolve(mod, lvl, search_dir, own_pkg, depth + 1, inner, memo)
        touched |= sub_touched
        height = max(height, sub_height + 1)
        complete = complete and sub.found and sub.complete
        supplied.update(sub.names)
    supplied.update(facts.bindings)
    if facts.all_names is not None:
        names = {n: supplied.get(n, "object") for n in facts.all_names}
        complete = not facts.all_dynamic
    else:
        names = {n: k for n, k in supplied.items() if not n.startswith("_")}
        complete = complete and not facts.all_dynamic
    exp, touched = StarExports(shown, True, names, complete, path), frozenset(touched)
    if not (touched & seen) and depth + height < MAX_DEPTH:  # cut by neither: reusable
        memo[path] = _Memo(exp, touched, height)
    return exp, touched, height


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
    """The file's facts: from this process's cache, the disk cache, or parsed (then stored in both).
    None when the file cannot be read or parsed."""
    stamp = _stamp(path)
    if stamp is None:
        return None
    key = (path,) + stamp
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    stored = _DISK.get(path, *stamp)
    if stored is not None:
        try:
            facts = _ModuleFacts.from_json(stored) if stored != "unreadable" else None
        except ValueError:
            _DISK.forget(path)
        else:
            _FACTS_CACHE[key] = facts
            return facts
    facts = _parse(path)
    _FACTS_CACHE[key] = facts
    _DISK.put(path, *stamp, facts.to_json() if facts is not None else "unreadable")
    return facts


def _parse(path: str) -> _ModuleFacts | None:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    facts = _ModuleFacts({}, None, False, False, [])
    _scan(tree.body, facts, top=True)
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
