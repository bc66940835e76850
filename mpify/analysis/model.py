"""Notebook -> ordered top-level statements, each with its cell, lines, source text and facts.

Why: the slicer works at top-level-statement granularity (never by line: a compound statement is
kept whole, so the emitted code always parses). This module parses every code cell once (after
`magics.translate_cell`), extracts each statement's exact source text (decorators and the comment
lines right above it included, trailing comments kept), runs the scope visitor on it, and then does
the one cross-statement pass the visitor cannot: a call `f(x)` is resolved against the latest
definition of `f` before it, so a notebook function that mutates its parameter (or assigns a global
through `global`) makes the call a mutation (or a definition) of the right names. Calling a
notebook object (`model(X)`) may change the object, not its arguments; builtins that are not known
pure may change their arguments (`next(it)`); constructing a notebook class changes nothing;
imported and star-supplied functions change only what effects.py lists.

What each global name is (a module, an imported object, a notebook function or class, or a value)
is decided here once for the whole notebook (`_name_kinds`), with the star imports resolved from
their modules' source (stars.py), and handed to the visitor, which applies effects.py's tables.

Cells that do not parse are recorded in `Model.broken` with a guess of the names they would define;
the slicer fails only if the slice needs one of them.
"""
from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass, field

from mpify.analysis.magics import translate_cell
from mpify.analysis.notebook import Notebook
from mpify.analysis.aliases import propagate
from mpify.analysis.effects import MUTATION_RANK, changes_first_arg
from mpify.analysis.evalmode import calls_train, eval_call, no_grad_only_calls
from mpify.analysis.facts import StatementFacts
from mpify.analysis.files import file_pseudo_name, link_files
from mpify.analysis.stars import resolve_star
from mpify.analysis.stateless import UNCHANGEABLE, StatelessNames
from mpify.analysis.summaries import effects_of, params_for
from mpify.analysis.visitor import analyse_statement

__all__ = ["Statement", "BrokenCell", "Model", "build_model"]

# `from pkg import sub` that usually binds a module (so calls on it are module calls, not mutations).
_SUBMODULE_NAMES = frozenset({"pyplot", "nn", "functional", "optim", "data", "distributed", "path",
                              "random", "linalg", "fft", "cuda", "backends", "transforms", "models",
                              "datasets", "utils", "F", "plt", "np", "pd", "sns", "tf", "jnp", "dist"})


@dataclass
class Statement:
    """One top-level statement of a code cell.

    index: position among all statements of the notebook (document order).
    cell: 1-based cell index; lineno/end_lineno: 1-based lines within the cell, decorators included.
    source: the text to emit (leading comment lines included, magics removed or translated);
    source_lineno: the cell line where `source` starts (<= lineno when comments lead).
    kind: 'function', 'class', 'lambda', 'import', 'assignment', 'expression', 'statement',
    'writefile'. notes: translation notes for its lines. defines: names it binds.
    """

    index: int
    cell: int
    lineno: int
    end_lineno: int
    source_lineno: int
    source: str
    kind: str
    facts: StatementFacts
    node: ast.AST | None = None
    notes: list = field(default_factory=list)
    file_write: str | None = None

    @property
    def defines(self) -> list[str]:
        return list(self.facts.defs)

    def where(self) -> str:
        if self.lineno == self.end_lineno:
            return f"cell {self.cell}, line {self.lineno}"
        return f"cell {self.cell}, lines {self.lineno}-{self.end_lineno}"


@dataclass
class BrokenCell:
    """A code cell that does not parse: where, why, and the names it looks like it defines."""

    cell: int
    lineno: int | None
    message: str
    names: set
    position: int  # number of statements before it (its place in statement order)


@dataclass
class Model:
    notebook: Notebook
    statements: list
    broken: list
    cell_end: dict  # cell index -> number of statements in cells 1..index
    events: dict  # name -> indices of statements that define, delete, mutate or alias it
    stars: dict = field(default_factory=dict)  # statement index -> StarExports of its star import
    faithful: bool = False  # the conservative reading (no star resolution, draws kept)
    kinds: dict = field(default_factory=dict)  # global name -> 'module' | 'object' | 'notebook'


def _kind(node) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return "function"
    if isinstance(node, ast.ClassDef):
        return "class"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "import"
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
        return "lambda"
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        return "assignment"
    if isinstance(node, ast.Expr):
        return "expression"
    return "statement"


def _module_names(trees) -> set:
    """Faithful mode's (the 0.3 reading's) modules: names bound by `import` anywhere at top level
    (also inside top-level if/try blocks), and `from pkg import sub` for usual submodule names."""
    out = set()
    stack = [n for t in trees for n in t.body]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Import):
            out.update(a.asname or a.name.split(".")[0] for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            for a in n.names:
                if a.name in _SUBMODULE_NAMES or (a.asname or "") in _SUBMODULE_NAMES:
                    out.add(a.asname or a.name)
        elif isinstance(n, (ast.If, ast.Try, ast.With)) or type(n).__name__ == "TryStar":
            for f in ("body", "orelse", "finalbody"):
                stack.extend(getattr(n, f, []))
            for h in getattr(n, "handlers", []):
                stack.extend(h.body)
    return out


_GUESS = [re.compile(p) for p in (
    r"^(?:async\s+)?def\s+(\w+)", r"^class\s+(\w+)", r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)",
    r"^import\s+(\w+)", r"^import\s+[\w.]+\s+as\s+(\w+)", r"^for\s+(\w+)")]


def _guess_names(source: str) -> set:
    names = set()
    for ln in source.splitlines():
        for rx in _GUESS:
            m = rx.match(ln)
            if m:
                names.add(m.group(1))
        m = re.match(r"^from\s+\S+\s+import\s+\(?([\w\s,]+)", ln)
        if m:
            for part in m.group(1).split(","):
                bits = part.split()
                if bits:
                    names.add(bits[-1])
        m = re.match(r"^(\w+(?:\s*,\s*\w+)+)\s*=(?!=)", ln)
        if m:
            names.update(x.strip() for x in m.group(1).split(","))
    return names


def _parse(text: str, cell: int):
    return compile(text, f"<cell {cell}>", "exec",
                   ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)


def _name_kinds(trees, stars: list) -> dict:
    """name -> 'module' | 'object' | 'notebook' for the global names whose every top-level binding
    is an `import` ('module'), a `from m import name` ('object'), or a `def`/`class` ('notebook');
    a name the notebook also assigns is a value (absent). Names only a resolved star import binds
    take the kind it gives them. `x = None` beside an import (`except ImportError: np = None`)
    does not make the name a value: it is the fallback of an optional import."""
    kinds: dict = {}
    values: set = set()

    def block(body):
        for n in body:
            if isinstance(n, ast.Import):
                for a in n.names:
                    kinds.setdefault(a.asname or a.name.split(".")[0], set()).add("module")
            elif isinstance(n, ast.ImportFrom):
                for a in n.names:
                    if a.name != "*":
                        name = a.asname or a.name
                        sub = name in _SUBMODULE_NAMES or a.name in _SUBMODULE_NAMES
                        kinds.setdefault(name, set()).add("module" if sub else "object")
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kinds.setdefault(n.name, set()).add("notebook")
            elif isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and n.value.value is None:
                continue
            elif isinstance(n, (ast.If, ast.Try, ast.With, ast.AsyncWith, ast.For, ast.AsyncFor,
                                ast.While)) or type(n).__name__ == "TryStar":
                for part in (getattr(n, "target", None), *[i.optional_vars for i in getattr(n, "items", [])]):
                    if part is not None:
                        stores(part)
                block(getattr(n, "body", []) + getattr(n, "orelse", []) + getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    if h.name:
                        values.add(h.name)
                    block(h.body)
            elif isinstance(n, ast.Assign):
                for t in n.targets:
                    stores(t)
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign)):
                stores(n.target)
            # Other statements bind no global name, except a walrus in an expression: such a name
            # also imported is too rare to pay a walk of every statement for (the benchmark).

    def stores(t):
        if isinstance(t, ast.Name):
            values.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                stores(e)
        elif isinstance(t, ast.Starred):
            stores(t.value)

    for t in trees:
        block(t.body)
    out = {}
    for name, ks in kinds.items():
        if name in values:
            continue
        out[name] = "module" if ks == {"module"} else ("notebook" if ks == {"notebook"} else "object")
    bound = set(kinds) | values
    for exp in stars:
        for name, k in exp.names.items():
            if name not in bound:
                out[name] = "module" if k == "module" else "object"
    return out


def _star_nodes(trees) -> list:
    """Top-level `from X import *` nodes, in order."""
    return [n for t in trees for n in t.body if isinstance(n, ast.ImportFrom)
            and any(a.name == "*" for a in n.names)]


def build_model(nb: Notebook, faithful: bool = False) -> Model:
    parsed = []  # (cell, pycell, tree | None)
    broken_raw = []
    for cell in nb.cells:
        if cell.kind != "code":
            continue
        pyc = translate_cell(cell.source)
        try:
            tree = _parse(pyc.text, cell.index)
        except SyntaxError as e:
            broken_raw.append((cell, e))
            parsed.append((cell, pyc, None))
            continue
        parsed.append((cell, pyc, tree))
    trees = [t for _, _, t in parsed if t is not None]
    exports: dict = {}  # id(ImportFrom node) -> StarExports
    if faithful:
        kinds = dict.fromkeys(_module_names(trees), "module")
    else:
        import os

        search_dir = os.path.dirname(os.path.abspath(nb.path)) if nb.path else None
        for node in _star_nodes(trees):
            exports[id(node)] = resolve_star(node.module or "", node.level or 0, search_dir)
        kinds = _name_kinds(trees, list(exports.values()))

    statements: list[Statement] = []
    broken: list[BrokenCell] = []
    cell_end: dict = {}
    future = False
    bad = {c.index: e for c, e in broken_raw}
    pc_iter = iter(parsed)
    for cell in nb.cells:
        if cell.kind == "code":
            _, pyc, tree = next(pc_iter)
            if tree is None:
                e = bad[cell.index]
                broken.append(BrokenCell(cell.index, e.lineno, e.msg, _guess_names(cell.source),
                                         len(statements)))
            else:
                future = _add_cell(statements, cell, pyc, tree, kinds, future, faithful)
        cell_end[cell.index] = len(statements)
    _resolve_calls(statements, kinds, faithful)
    link_files(statements)
    # Changes reach the names that may share the changed object (aliases.py), after the calls
    # are resolved (a call of a notebook function changes what its body changes).
    propagate(statements, set().union(*(st.facts.grad_names for st in statements)), faithful, kinds)
    stars = {st.index: exports[id(st.node)] for st in statements if id(st.node) in exports}
    events: dict = {}
    for st in statements:
        f = st.facts
        for name in {**f.defs, **f.dels, **f.mutates}:
            events.setdefault(name, []).append(st.index)
    return Model(nb, statements, broken, cell_end, events, stars, faithful, kinds)


def _add_cell(statements, cell, pyc, tree, kinds, future, faithful) -> bool:
    lines = pyc.text.split("\n")
    body = tree.body
    if pyc.file_write is not None:
        # `%%writefile path`: a synthetic statement that defines the pseudo-name `<file:path>`.
        fw = pyc.file_write
        facts = StatementFacts()
        pseudo = file_pseudo_name(fw.path)
        facts.defs[pseudo] = not fw.append
        if fw.append:
            facts.mutates[pseudo] = "direct"
        facts.writes_files.add(fw.path)
        statements.append(Statement(len(statements), cell.index, 1, fw.end_lineno, 1, fw.source,
                                    "writefile", facts, None, [], fw.path))
        return future
    prev_end = 0
    for i, node in enumerate(body):
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        end = node.end_lineno
        shares_prev = i > 0 and body[i - 1].end_lineno == start
        shares_next = i + 1 < len(body) and body[i + 1].lineno == end
        if shares_prev or shares_next:
            # `a = 1; b = 2`: cut the line by columns so each statement gets its own text.
            seg_lines = lines[start - 1:end]
            first_col = node.col_offset if shares_prev else 0
            if not getattr(node, "decorator_list", None):
                first_col = node.col_offset if shares_prev else 0
            if len(seg_lines) == 1:
                stop = node.end_col_offset if shares_next else len(seg_lines[0])
                seg_lines = [seg_lines[0][first_col:stop]]
            else:
                seg_lines[0] = seg_lines[0][first_col:]
                if shares_next:
                    seg_lines[-1] = seg_lines[-1][: node.end_col_offset]
            src_lines = seg_lines
        else:
            src_lines = lines[start - 1:end]
        # Comment lines right above the statement travel with it (the comment over a def).
        s = start
        while s - 1 > prev_end and lines[s - 2].strip().startswith("#"):
            s -= 1
        if shares_prev:
            s = start
        src_lines = lines[s - 1:start - 1] + src_lines if s < start else src_lines
        prev_end = end
        facts = analyse_statement(node, kinds, future, faithful)
        for mod in facts.modules:
            # `import helper` may need the file a `%%writefile helper.py` cell made, `from
            # going_modular import data_setup` the one `%%writefile going_modular/data_setup.py` did.
            facts.soft_uses.setdefault(f"<module:{mod}>", node.lineno)
        if facts.future_annotations:
            future = True
        notes = [f"cell {cell.index}, line {ln}: {msg}" for ln, msg in sorted(pyc.notes.items())
                 if start <= ln <= end] if pyc.notes else []
        if pyc.opaque:
            for ln, why in sorted(pyc.opaque.items()):
                if start <= ln <= end:
                    facts.opaque = facts.opaque or why
        source = "\n".join(src_lines).rstrip() + "\n"
        statements.append(Statement(len(statements), cell.index, start, end, s, source,
                                    _kind(node), facts, node, notes))
    return future


def _resolve_calls(statements, kinds, faithful=False) -> None:
    """Turn `f(x)` calls into mutations/definitions using the latest notebook definition of `f`,
    followed through the notebook functions its body calls (summaries.py)."""
    latest: dict = {}
    memo: dict = {}  # summaries already followed (summaries.effects_of)
    values = StatelessNames()
    in_eval: set = set()  # notebook objects last touched by `obj.eval()` (evalmode.py)
    for st in statements:
        f = st.facts
        looks = None  # the objects this statement calls only under no_grad, when asked
        for callee, pos, kws, _line in f.calls:  # BareCall
            summ = latest.get(callee)
            if summ is not None and summ.is_class:
                continue  # constructing a notebook class: arguments assumed stored, not mutated
            if summ is not None:
                # (its body may put a model in train mode through a name the analyzer links to
                # the model only later, aliases.propagate: no object stays known in eval mode)
                in_eval.clear()
                eff = effects_of(summ, latest, memo, (id(summ),))
                args = list(zip(params_for(summ, len(pos)), pos)) + list(kws.items())
                for p, arg in args:
                    if not arg or p is None:
                        continue
                    if p in eff.params:
                        _add_effect(f, arg, eff.params[p], faithful, values)
                    if p in eff.grad_params:
                        f.grad_names.add(arg)
                    if p in eff.grad_writes:
                        f.grad_writes.add(arg)
                for g, kind in eff.globals.items():
                    _add_effect(f, g, kind, faithful, values)
                for g in eff.writes:
                    f.defs.setdefault(g, False)  # the call may (re)define g: a weak definition
                    f.stateless.pop(g, None)  # to what, the analyzer does not know
                f.grad_writes |= eff.global_grad_writes
                f.grad_names |= eff.grad_globals
                continue
            if callee not in latest and not hasattr(builtins, callee):
                # Nothing in the notebook binds it before: a star import's function (an unknown
                # name is an error later). Read it as a call on that module (`np.zeros(x)`): only
                # known mutators and `name_` functions change their first argument, so that
                # `numel(data)` does not drag its cell into the slice.
                if pos and pos[0] and changes_first_arg(callee):
                    _add_mutation(f, pos[0], "direct", values)
                continue
            if summ is None and kinds.get(callee) in ("module", "object"):
                # An imported function (`show_image(img)`, `xavier_uniform_(w)`): listed effects only.
                if pos and pos[0] and changes_first_arg(callee):
                    _add_mutation(f, pos[0], "direct", values)
                continue
            if callee not in latest:
                # A builtin that PURE_BUILTINS does not clear: it may change its arguments;
                # `next(it)` does change its iterator, and what the iterator shares (`it =
                # iter(gen)` is gen itself), not what a new iterator only reads (`iter(loader)`:
                # aliases.iteration_facts).
                for i, arg in enumerate(list(pos) + list(kws.values())):
                    if arg:
                        _add_mutation(f, arg, "direct" if i == 0 and changes_first_arg(callee) else "call-arg",
                                      values, own=callee == "next" and i == 0)
                continue
            # Calling a notebook object (`linear_model(X)`): as for a method call on it, it may
            # change the object (a stateful callable), not its arguments (issue 11: `X` was read
            # as changed by every `model(X)` of the exploration cells). Not a forward pass in eval
            # mode under no_grad (evalmode.py).
            if callee in in_eval and st.node is not None:
                looks = no_grad_only_calls(st.node) if looks is None else looks
                if callee in looks:
                    continue
            _add_mutation(f, callee, "called", values)
        after = f.values_after = values.after(f)  # (aliases.propagate reads it again)
        if f.through:
            for n in f.through:
                # `nn.Linear(n_feat, 1).to(device)` changes the result in place, not `n_feat`.
                if f.mutates.get(n) == "direct" and not values.changeable(n, after):
                    del f.mutates[n]
        if after:
            values.advance(f, after)
        for name in f.defs:
            latest[name] = f.summaries.get(name)
        if in_eval:
            if st.node is not None and calls_train(st.node):
                in_eval.clear()
            in_eval.difference_update(f.mutates, f.defs, f.dels)
        put = eval_call(st.node)  # (a look at the statement's top node only)
        if put is not None:
            in_eval.add(put)


def _add_effect(f, name, kind, faithful, values=None):
    """A change a called function makes: a draw only counts in faithful mode (as a draw at top
    level); a seed or a module's state stays what it is; any other change is a change."""
    if kind == "draw":
        if faithful:
            _add_mutation(f, name, "draw", values)
        return
    _add_mutation(f, name, kind if kind in ("seed", "state") else "direct", values)


def _add_mutation(f, name, kind, values=None, own=False):
    """values: the names holding a state-less value (stateless.py), which no call changes:
    `evaluate(m)`, whose body does `xb = xb.to(device)`, does not change `device`; a
    generator's `next(..)` over `range(len(data))` does not change `len`. (A name the statement
    binds itself is left as it is: which of its values the call sees is not known here.)"""
    if values is not None and kind in UNCHANGEABLE and name not in f.defs and values.holds(name):
        return
    old = f.mutates.get(name)
    if own and old is None:
        f.own.add(name)  # a change of the object itself only (`next(it)`)
    elif not own:
        f.own.discard(name)  # a called function's change may reach what the object holds
    if old is None or MUTATION_RANK[kind] > MUTATION_RANK[old]:
        f.mutates[name] = kind
