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
import os

__all__ = ["link_files", "file_pseudo_name"]

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
        elif isinstance(node, ast.Attribute) and node.attr == "parent":  # (`p.name` is a file name)
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


class _Scan:
    """What one statement says about files, from one walk of its tree: `writes` (the leads of the
    paths it writes under), `modules` (`<module:name>` of the `.py` files it writes by a literal
    path: an import of it reads that file), `bindings` (name -> the lead of the path it is bound
    to, in loops and branches too: `for f in files: path = os.path.join(CKPT, f)`), `strings`
    (the leads of the path-like literals it reads, function bodies included). Function bodies
    write and bind when called, and a call of a notebook function is not followed here."""

    __slots__ = ("writes", "modules", "bindings", "strings")

    def __init__(self, node):
        self.writes: set = set()
        self.modules: set = set()
        self.bindings: dict = {}
        self.strings: set = set()
        stack = [(node, False)]
        while stack:
            n, in_body = stack.pop()
            if isinstance(n, ast.Constant):
                if isinstance(n.value, str) and "/" in n.value and "\n" not in n.value:
                    self.strings.add(_lead(n))
                continue
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                in_body = True
            elif not in_body:
                if isinstance(n, ast.Call):
                    self._call(n)
                elif (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                      and isinstance(n.value, (ast.BinOp, ast.JoinedStr, ast.Call, ast.Attribute))):
                    lead = _lead(n.value)
                    if lead is not None and lead != n.targets[0].id:
                        self.bindings[n.targets[0].id] = lead
            stack.extend((c, in_body) for c in ast.iter_child_nodes(n))
        self.writes.discard(None)
        self.strings.discard(None)

    def _call(self, n) -> None:
        func = n.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("open", "ZipFile", "TarFile", "urlretrieve") and n.args:  # (`tarfile.open(p, "w:gz")`)
            arg = n.args[1] if name == "urlretrieve" and len(n.args) > 1 else n.args[0]
            mode = n.args[1] if len(n.args) > 1 else next((k.value for k in n.keywords if k.arg == "mode"), None)
            if name == "urlretrieve" or (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                                         and set(mode.value) & set("wax")):
                self.writes.add(_lead(arg))
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.endswith(".py"):
                    self.modules.add(file_pseudo_name(arg.value))
        if name == "save":
            # `torch.save(obj, p)`, `np.save(p, a)`, `img.save(p)`: whichever argument is written
            # as a path (a bare name is the object saved, as often as the path)
            self.writes.update(_lead(a) for a in n.args if not isinstance(a, ast.Name))
        elif name in _WRITES_ARG:
            i = _WRITES_ARG[name]
            arg = n.args[i] if len(n.args) > i else next(
                (k.value for k in n.keywords if k.arg in ("path", "dst", "root", "filename", "f",
                                                           "extract_root", "download_root")), None)
            if arg is not None:
                self.writes.add(_lead(arg))
        if name in _WRITES_RECEIVER and isinstance(func, ast.Attribute):
            self.writes.add(_lead(func.value))


def file_pseudo_name(path: str) -> str:
    """`<module:helper>` for `helper.py` (what `import helper` reads), `<module:pkg.mod>` for
    `pkg/mod.py` and `<module:pkg>` for `pkg/__init__.py` (relative to the notebook's folder, where
    imports look first); else `<file:path>`. A `.py` path outside the folder (`../x.py`, absolute)
    is named by its file name."""
    if not path.endswith(".py"):
        return f"<file:{path}>"
    parts = os.path.normpath(path).split(os.sep)
    if os.path.isabs(path) or ".." in parts or not all(p.isidentifier() for p in parts[:-1]):
        return f"<module:{os.path.basename(path)[:-3]}>"
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return f"<module:{'.'.join(parts)}>"


def _root(lead, roots: dict, local: dict) -> str:
    """The root of `lead`: through the statement's own bindings, then the earlier statements'."""
    seen = set()
    while lead in local and lead not in seen:
        seen.add(lead)
        lead = local[lead]
    return roots.get(lead, lead)


# A statement whose source has none of these has nothing `_Scan` looks for (a write call, a path
# built by `/`, `+`, a path call or `.parent`, a literal with a `/`): its walk is skipped.
_TRIGGERS = ("/", "+", "open", "Zip", "Tar", "urlretrieve", "save", "makedirs", "mkdir", "copy",
             "move", "unpack_archive", "extract", "download", "write_bytes", "write_text", "touch",
             "Path", "join", "with_suffix", "with_name", "expanduser", "resolve", "absolute",
             "abspath", "dirname", "parent")
_NOTHING = None


def _scan(st) -> "_Scan":
    global _NOTHING
    if any(t in st.source for t in _TRIGGERS):
        return _Scan(st.node)
    if _NOTHING is None:
        _NOTHING = _Scan(ast.Pass())
    return _NOTHING


def link_files(statements) -> None:
    """Add `<fs:root>` changes and reads to the statements' facts (see the docstring)."""
    scans = [(st, _scan(st)) for st in statements if st.node is not None]
    roots: dict = {}  # name -> its root, as of the statement being read
    written: set = set()  # roots some statement writes under
    for st, scan in scans:
        f = st.facts
        for lead in scan.writes:
            root = _root(lead, roots, scan.bindings)
            f.mutates[f"<fs:{root}>"] = "direct"
            written.add(root)
        for module in scan.modules:
            f.mutates.setdefault(module, "direct")
        _advance(roots, f, scan)
    if not written:
        return
    roots = {}
    for st, scan in scans:
        f = st.facts
        for uses, soft in ((f.uses_now, f.soft_uses), (f.uses_later, f.uses_later)):
            for name, line in list(uses.items()):
                root = roots.get(name, name)
                if root in written:
                    soft.setdefault(f"<fs:{root}>", line)
        for lead in scan.strings:
            if lead in written:
                f.soft_uses.setdefault(f"<fs:{lead}>", st.lineno)
        _advance(roots, f, scan)


def _advance(roots: dict, f, scan: _Scan) -> None:
    """The roots after the statement: its rebindings forget the old root, its paths add theirs."""
    for name in f.defs:
        roots.pop(name, None)
    for name, lead in scan.bindings.items():
        roots[name] = _root(lead, roots, scan.bindings)
