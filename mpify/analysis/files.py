"""Files on disk: a statement that writes under a path is needed by what later reads that path.

Why a module of its own: files are not names, so nothing linked a lesson's download to the training
that reads the data (issue 25's validation set: of 922 statements a reader keeps, the slices left
out 88, most of them a download and its extraction):

    data_path = Path("data/")
    image_path = data_path / "pizza_steak_sushi"
    with open(data_path / "pizza_steak_sushi.zip", "wb") as f: ...     # writes under data_path
    zipfile.ZipFile(data_path / "pizza_steak_sushi.zip").extractall(image_path)
    train_dir = image_path / "train"                                    # read by the target

A path is followed to its root name: a name bound to a path built from another (`/`, `Path(..)`,
`os.path.join`, `.joinpath`, `.parent`, an f-string that starts with it) has that one's root, any
other name is its own root. A write under a path (`open(p, "w"/"wb"/"a"/"x")`, `ZipFile(p, "w")`,
`.extractall(p)`,
`p.mkdir()`, `p.write_bytes(..)`, `os.makedirs(p)`, `urlretrieve(url, p)`, `torch.save(obj, p)`,
`shutil.copy(src, p)`...) is a change of the pseudo-name `<fs:root>`; a statement that reads a
name of that root, or a function body that does, reads `<fs:root>` (softly: never an error), so
the slicer keeps the writes before it. Coarse on purpose: every write under `data/` counts for
every read under it. A path given as a literal string (`open("data/x.zip", "wb")`) is matched by
its first folder (`<fs:"data">`) against literals read the same way.
"""
from __future__ import annotations

import ast

__all__ = ["link_files"]

# Calls that write under the path they are given: (name of the call, index of the path argument);
# -1: the receiver is the path (`p.mkdir()`).
_WRITES_ARG = {"makedirs": 0, "mkdir": 0, "urlretrieve": 1, "copy": 1, "copy2": 1,
               "copyfile": 1, "copytree": 1, "move": 1, "unpack_archive": 1, "extractall": 0,
               "extract": 1, "download_url": 1, "download_and_extract_archive": 1}
_WRITES_RECEIVER = frozenset({"mkdir", "write_bytes", "write_text", "touch", "extractall"})
_PATH_CALLS = frozenset({"Path", "PurePath", "PosixPath", "join", "joinpath", "with_suffix",
                         "with_name", "expanduser", "resolve", "absolute", "abspath", "dirname"})


def _lead(node) -> str | None:
    """The name (or `"literal"` first folder) a path expression starts from, or None."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            head = node.value.strip("./").split("/")[0]
            return f'"{head}"' if head else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.Add)):
            node = node.left
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            node = first.value if isinstance(first, ast.FormattedValue) else first
        elif isinstance(node, ast.Attribute) and node.attr in ("parent", "name", "stem"):
            node = node.value
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in _PATH_CALLS:
                return None
            if isinstance(node.func, ast.Attribute) and name in ("joinpath", "with_suffix", "with_name",
                                                                  "expanduser", "resolve", "absolute"):
                node = node.func.value
            elif node.args:
                node = node.args[0]
            else:
                return None
        else:
            return None


def _writes(node) -> set:
    """The leads of the paths the statement writes under (function bodies aside: they write when
    called, and a call of a notebook function is not followed here)."""
    out: set = set()

    def walk(n):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return
        if isinstance(n, ast.Call):
            func = n.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("open", "ZipFile", "TarFile") and n.args:  # (`tarfile.open(p, "w:gz")` too)
                mode = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax"):
                    out.add(_lead(n.args[0]))
            if name == "save":
                # `torch.save(obj, p)`, `np.save(p, a)`, `img.save(p)`: whichever argument is
                # written as a path (a bare name is the object saved, as often as the path)
                out.update(_lead(a) for a in n.args if not isinstance(a, ast.Name))
            elif name in _WRITES_ARG:
                i = _WRITES_ARG[name]
                arg = n.args[i] if len(n.args) > i else next(
                    (k.value for k in n.keywords if k.arg in ("path", "dst", "root", "filename", "f",
                                                               "extract_root", "download_root")), None)
                if arg is not None:
                    out.add(_lead(arg))
            if name in _WRITES_RECEIVER and isinstance(func, ast.Attribute):
                out.add(_lead(func.value))
        for child in ast.iter_child_nodes(n):
            walk(child)

    walk(node)
    out.discard(None)
    return out


def _path_bindings(node) -> dict:
    """name -> the lead of the path it is bound to, for every `x = <path expression>` of the
    statement, in loops and branches too (`for f in files: path = os.path.join(CKPT, f)`), not
    in function bodies."""
    out: dict = {}

    def walk(n):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return
        if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
            if isinstance(n.value, (ast.BinOp, ast.JoinedStr, ast.Call, ast.Attribute)):
                lead = _lead(n.value)
                if lead is not None and lead != n.targets[0].id:
                    out[n.targets[0].id] = lead
        for child in ast.iter_child_nodes(n):
            walk(child)

    walk(node)
    return out


def _root(lead, roots: dict, local: dict) -> str:
    """The root of `lead`: through the statement's own bindings, then the earlier statements'."""
    seen = set()
    while lead in local and lead not in seen:
        seen.add(lead)
        lead = local[lead]
    return roots.get(lead, lead)


def _written_modules(node) -> set:
    """`<module:name>` for each `.py` file the statement writes by a literal path (`with
    open("helper_functions.py", "wb")`): an import of it reads that file (slicer's `<module:..>`)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and n.args and (getattr(n.func, "id", None) == "open"
                                                    or getattr(n.func, "attr", None) in ("open", "urlretrieve")):
            arg = n.args[1] if getattr(n.func, "attr", None) == "urlretrieve" and len(n.args) > 1 else n.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.endswith(".py"):
                parts = arg.value.strip("./")[:-3].split("/")
                if all(p.isidentifier() for p in parts):
                    out.add(f"<module:{'.'.join(parts)}>")
    return out


def link_files(statements) -> None:
    """Add `<fs:root>` changes and reads to the statements' facts (see the docstring)."""
    roots: dict = {}  # name -> its root, as of the statement being read
    written: set = set()  # roots some statement writes under
    for st in statements:
        if st.node is None:
            continue
        f = st.facts
        local = _path_bindings(st.node)
        for lead in _writes(st.node):
            root = _root(lead, roots, local)
            f.mutates[f"<fs:{root}>"] = "direct"
            written.add(root)
        for module in _written_modules(st.node):
            f.mutates.setdefault(module, "direct")
        for name in f.defs:
            roots.pop(name, None)
        for name, lead in local.items():
            roots[name] = _root(lead, roots, local)
    if not written:
        return
    roots = {}
    for st in statements:
        if st.node is None:
            continue
        f = st.facts
        for uses, soft in ((f.uses_now, f.soft_uses), (f.uses_later, f.uses_later)):
            for name, line in list(uses.items()):
                root = roots.get(name, name)
                if root in written:
                    soft.setdefault(f"<fs:{root}>", line)
        for s in _string_leads(st.node):
            if s in written:
                f.soft_uses.setdefault(f"<fs:{s}>", st.lineno)
        local = _path_bindings(st.node)
        for name in f.defs:
            roots.pop(name, None)
        for name, lead in local.items():
            roots[name] = _root(lead, roots, local)


def _string_leads(node) -> set:
    """The first folders of the path-like string literals the statement reads (`"data/x.csv"`)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "/" in n.value and "\n" not in n.value:
            lead = _lead(n)
            if lead is not None:
                out.add(lead)
    return out
