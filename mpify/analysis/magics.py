"""IPython syntax -> Python text, line for line.

Why: the analyzer and the exported script must read the same Python. Each code cell becomes a
`PyCell` whose `text` has the same number of lines as the cell, line K of the text standing for line
K of the cell, so every statement keeps its cell and line numbers (a traceback in the exported
script maps back to the notebook). IPython does the recognising (`TransformerManager.transform_cell`,
never regexes of our own for magics); this module then rewrites each `get_ipython()` line:

- `%%time` / `%%capture [var]` cells: the first line becomes blank and the body is translated like a
  cell of its own, so its statements are ordinary statements (they run in the user namespace).
  `%%capture var` defines `var`: line 1 becomes `var = None  # ...`, and a note says the captured
  output is not reproduced.
- `%%ranch` cells (mpify's live world): the kernel runs the body as rank 0, in the user namespace,
  so it is read like `%%time`'s; `%%ranch --ranks 1,2` (rank 0 not among them) leaves nothing
  in the kernel and reads as blank.
- `%time stmt`: replaced by `stmt` (it runs in the user namespace, so it defines what stmt defines).
- `x = !cmd` / `x = %sx cmd`: translated to `x = __import__('subprocess').getoutput(f"cmd").splitlines()`
  (IPython's `{expr}` and `$name` interpolation becomes an f-string, so the names it reads are
  seen as uses). The result is a plain list of lines, not IPython's SList: a note says so.
- `%%writefile [-a] path`: not Python; recorded as a synthetic statement that writes the file, emitted
  as `__import__('pathlib').Path(path).write_text(body)` (or an append), so a later `import helper`
  can depend on it.
- `%run` / `%store` (they define names we cannot see): the line becomes `pass` and is marked
  opaque, so the slice can warn about it.
- Every other magic, shell escape and help request (`!pip`, `%matplotlib`, `%load_ext`, `df?`) defines
  nothing: a blank line at top level, `pass` inside an indented block (so `if COLAB: !pip install x`
  stays a valid block).
- Other cell magics (`%%bash`, `%%html`, `%%timeit`, `%%sql`...) are not Python (or, for `%%timeit`,
  leave no names behind): the whole cell becomes blank lines.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
from dataclasses import dataclass, field

__all__ = ["PyCell", "FileWrite", "translate_cell"]

# Cell magics whose body runs as Python in the user namespace, leaving its names behind.
_PYTHON_BODY_CELL_MAGICS = {"time", "capture", "prun"}
# Line magics that define names the analyzer cannot see.
_OPAQUE_LINE_MAGICS = {"run", "store", "load", "recall"}
# Quick check that a cell may hold IPython syntax; cells without any of these skip the transformer.
_MAYBE_MAGIC = re.compile(r"^\s*[%!?]|^[^#\n]*=\s*[%!]|\?\s*$|^\s*(>>>|In \[)", re.M)

_tm = None


def _transformer():
    global _tm
    if _tm is None:
        from IPython.core.inputtransformer2 import TransformerManager

        _tm = TransformerManager()
    return _tm


@dataclass
class FileWrite:
    """A `%%writefile` cell: it writes `path` (append if `append`). `source` is its Python translation."""

    path: str
    append: bool
    source: str
    end_lineno: int


@dataclass
class PyCell:
    """The Python text of one code cell, line for line with the cell's source.

    notes: lineno -> what was translated there (reported as warnings when the line is in a slice).
    opaque: lineno -> why the line may define names the analyzer cannot see (`%run`, `%store`).
    file_write: set for a `%%writefile` cell.
    """

    text: str
    notes: dict[int, str] = field(default_factory=dict)
    opaque: dict[int, str] = field(default_factory=dict)
    file_write: FileWrite | None = None
    cell_magic: str | None = None


def translate_cell(source: str) -> PyCell:
    """Translate one code cell's source to Python text with the same line numbering."""
    lines = source.splitlines()
    # A cell magic must be the first non-blank line (IPython drops leading blank lines first).
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is not None and lines[first].startswith("%%"):
        return _cell_magic(lines, first)
    out = PyCell("")
    out.text = _translate_lines(lines, 0, out)
    return out


def _cell_magic(lines: list[str], first: int) -> PyCell:
    head = lines[first][2:].strip()
    name, _, arg = head.partition(" ")
    arg = arg.strip()
    out = PyCell("", cell_magic=name)
    body = lines[first + 1:]
    blank_head = [""] * (first + 1)
    if name in _PYTHON_BODY_CELL_MAGICS or (name == "ranch" and _ranch_runs_rank0(arg)):
        body_text = _translate_lines(body, first + 1, out)
        if name == "capture":
            var = _capture_var(arg)
            if var:
                # %%capture var defines var (a CapturedIO); a script has no capture, so the name is
                # bound to None and the report says so.
                blank_head[first] = f"{var} = None  # %%capture {arg}: output capture is not reproduced"
                out.notes[first + 1] = (f"`%%capture {arg}` translated to `{var} = None`: "
                                        "the captured output is not reproduced")
        out.text = "\n".join(blank_head) + ("\n" + body_text if body else "") + "\n"
        return out
    out.text = "\n" * len(lines)
    if name == "writefile":
        try:
            toks = shlex.split(arg)
        except ValueError:
            toks = arg.split()
        append = "-a" in toks or "--append" in toks
        paths = [t for t in toks if not t.startswith("-")]
        if paths:
            body_src = "\n".join(body) + "\n"
            p = paths[0]
            if append:
                src = f"with open({p!r}, 'a') as _mpify_f:\n    _mpify_f.write({body_src!r})\n"
            else:
                src = f"__import__('pathlib').Path({p!r}).write_text({body_src!r})\n"
            if os.path.dirname(p):
                # (the notebook made the folder in a cell the slice may leave out: `os.makedirs`)
                src = f"__import__('os').makedirs({os.path.dirname(p)!r}, exist_ok=True)\n" + src
            out.file_write = FileWrite(p, append, src, len(lines))
    return out


def _ranch_runs_rank0(arg: str) -> bool:
    """Whether `%%ranch ARG` runs in the kernel (rank 0): no --ranks, or 0 among them."""
    toks = arg.replace("=", " ").split()
    if "--ranks" not in toks and "-r" not in toks:
        return True
    listed = " ".join(toks[toks.index("--ranks" if "--ranks" in toks else "-r") + 1:])
    return "0" in re.split(r"[\s,\[\]]+", listed)


def _capture_var(arg: str) -> str | None:
    toks = [t for t in arg.split() if not t.startswith("-")]
    if toks and toks[-1].isidentifier():
        return toks[-1]
    return None


def _translate_lines(lines: list[str], offset: int, out: PyCell) -> str:
    """Translate `lines` (cell lines offset+1...) to Python text with the same number of lines."""
    text = "\n".join(lines) + "\n"
    if not _MAYBE_MAGIC.search(text):
        return "\n".join(lines)  # fast path: plain Python, nothing for IPython to do
    try:
        new = _transformer().transform_cell(text)
    except Exception:  # IPython's tokenizer can give up on broken code; the parser will report it
        return "\n".join(lines)
    new_lines = new.splitlines()
    if len(new_lines) < len(lines):
        new_lines += [""] * (len(lines) - len(new_lines))
    if len(new_lines) != len(lines):
        # A magic continued over several lines (`%time a = \` ...): IPython joined them. Keep the
        # joined form; line numbers after it are approximate (rare; the parse still works).
        pass
    result = []
    for i, ln in enumerate(new_lines):
        if "get_ipython()" in ln and (i >= len(lines) or ln != lines[i]):
            ln = _translate_line(ln, offset + i + 1, out)
        result.append(ln)
    return "\n".join(result)


_INTERP = re.compile(r"\{([^{}]+)\}|\$(\w+)")


def _fstring(cmd: str) -> str:
    """IPython's shell interpolation (`{expr}`, `$name`; `$$` for a literal $) as a Python literal."""
    if not _INTERP.search(cmd):
        return repr(cmd)
    parts, pos = [], 0
    for m in _INTERP.finditer(cmd):
        if m.start() > 0 and cmd[m.start() - 1] == "$" and m.group(2):  # `$$name` is literal
            continue
        parts.append(cmd[pos:m.start()].replace("{", "{{").replace("}", "}}"))
        parts.append("{" + (m.group(1) or m.group(2)) + "}")
        pos = m.end()
    parts.append(cmd[pos:].replace("{", "{{").replace("}", "}}"))
    body = "".join(parts).replace("$$", "$")
    lit = "f" + repr(body)
    try:
        ast.parse(lit, mode="eval")
    except SyntaxError:
        return repr(cmd)
    return lit


def _ipy_call(node):
    """(method, args) if node is `get_ipython().method(args...)`, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "get_ipython"):
        args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
        return node.func.attr, args
    return None


def _translate_line(ln: str, lineno: int, out: PyCell) -> str:
    indent = ln[: len(ln) - len(ln.lstrip())]
    stripped = ln.strip()
    try:
        tree = ast.parse(stripped)
    except SyntaxError:
        return ln
    if len(tree.body) != 1:
        return ln
    stmt = tree.body[0]
    nothing = indent + "pass" if indent else ""
    if isinstance(stmt, ast.Expr):
        call = _ipy_call(stmt.value)
        if call is None:
            return ln
        meth, args = call
        if meth == "run_line_magic" and args and args[0] == "time" and len(args) > 1:
            return indent + str(args[1])  # `%time stmt` runs stmt in the user namespace
        if meth == "run_line_magic" and args and args[0] in _OPAQUE_LINE_MAGICS:
            magic = f"%{args[0]} {args[1] if len(args) > 1 else ''}".strip()
            out.opaque[lineno] = f"`{magic}` may define names the analyzer cannot see"
            return indent + f"pass  # {magic} (not translated)"
        return nothing
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
        call = _ipy_call(stmt.value)
        if call is None:
            return ln
        meth, args = call
        v = stmt.value
        # Column offsets are within `stripped`; rebuild the line around the call.
        pre, post = stripped[: v.col_offset], stripped[v.end_col_offset:]
        cmd = args[0] if args else None
        if meth == "getoutput" and isinstance(cmd, str):
            new = f"__import__('subprocess').getoutput({_fstring(cmd)}).splitlines()"
            out.notes[lineno] = (f"`!{cmd}` translated to subprocess.getoutput(...).splitlines() "
                                 "(a list of lines, not IPython's SList)")
            return indent + pre + new + post
        if meth == "run_line_magic" and args and args[0] == "sx" and len(args) > 1:
            new = f"__import__('subprocess').getoutput({_fstring(str(args[1]))}).splitlines()"
            out.notes[lineno] = f"`%sx {args[1]}` translated to subprocess.getoutput(...).splitlines()"
            return indent + pre + new + post
        if meth == "run_line_magic" and args and args[0] == "time" and len(args) > 1:
            return indent + pre + str(args[1]) + post
        # `x = %timeit -o f()` and the like: the value comes from IPython; bind None and say so.
        magic = f"%{args[0]} {args[1] if len(args) > 1 else ''}".strip() if meth == "run_line_magic" else meth
        out.notes[lineno] = f"`{magic}` cannot be translated; its target is bound to None"
        return indent + pre + "None" + post + f"  # {magic} (not translated)"
    return ln
