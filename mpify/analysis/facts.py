"""What the visitor reads and what it returns: the vocabulary of a notebook's global names, and
the facts of one top-level statement.

Why a module of its own: the facts are the interface between the visitor, whose parts (visitor.py,
visit_statements.py, visit_scopes.py, visit_calls.py) each fill some of them in, and the model,
which builds `StatementFacts` itself for a `%%writefile` cell (the visitor never sees one) and
resolves the `BareCall`s across statements (model._resolve_calls). What a global name is comes
from the `kinds` map the model builds: 'module', 'object' or 'notebook' (visitor.py's docstring).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["StatementFacts", "BareCall"]

# Kinds of global names that are not values a binding may share (an imported object may be one).
_EXTERNAL = frozenset({"module", "notebook"})


class BareCall(NamedTuple):
    """A call of a bare global name made when a statement runs (`f(x, k=y)`), resolved later
    against the latest definition of `f` (model._resolve_calls)."""

    callee: str
    pos: list  # root name of each positional argument (None for a literal or a call result)
    kws: dict  # keyword -> root name of its argument
    line: int


@dataclass(init=False)
class StatementFacts:
    """Facts about one top-level statement; line numbers are cell lines.

    defs: name -> True for an unconditional binding (it hides earlier ones), False for a conditional one.
    dels: name -> True for an unconditional `del name`, False for a conditional one (or `except as`).
    uses_now / uses_later / soft_uses: name -> first line where it is read (soft: annotations that are
    not evaluated, resolved if possible but never an error).
    mutates: name -> 'direct' | 'call-arg' | 'called' | 'state' | 'seed' | 'draw' | 'grad' |
    'alias' (how it may change the object; a seed redefines a generator's state, a draw only
    moves it; 'grad' and 'alias' are added by aliases.propagate, with `via`: the name the change
    was made through). deep: names changed through an element or attribute (`b[0].append(1)`).
    bindings: ([names], Sources) for each top-level binding (aliases.py reads what it may share).
    through: names changed only through a call's result made from them (`nn.Linear(n).to(d)`).
    grad_writes: names a backward runs through; grad_names: names whose gradients are used.
    calls: `BareCall`s, the calls of bare global names made now.
    binds: name -> how many times the statement binds it, where more than once; stateless:
    name -> (how many of its bindings are to a state-less value, the names they are so given:
    stateless.py). values_after: the model's, name -> whether it holds a state-less value
    after the statement, for the names it binds or deletes.
    launches: names passed to a launcher call (`ranch(4, train)`).
    iterables: name -> the class it is bound to an instance of ("" for a container literal), a
    value that is not its own iterator (aliases.iteration_facts); iter_of: name -> the name whose
    `iter(..)` it is bound to. modules: the dotted modules a top-level import may load
    (`from pkg import mod`: `pkg` and `pkg.mod`), which a `%%writefile` cell may have written.
    """

    defs: dict = field(default_factory=dict)
    dels: dict = field(default_factory=dict)
    uses_now: dict = field(default_factory=dict)
    uses_later: dict = field(default_factory=dict)
    soft_uses: dict = field(default_factory=dict)
    mutates: dict = field(default_factory=dict)
    via: dict = field(default_factory=dict)
    deep: set = field(default_factory=set)
    own: set = field(default_factory=set)
    bindings: list = field(default_factory=list)
    through: set = field(default_factory=set)
    binds: dict = field(default_factory=dict)
    stateless: dict = field(default_factory=dict)
    values_after: dict | None = None
    grad_writes: set = field(default_factory=set)
    grad_names: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    called_now: set = field(default_factory=set)
    launches: set = field(default_factory=set)
    summaries: dict = field(default_factory=dict)
    opaque: str | None = None
    opaque_later: str | None = None
    star_import: str | None = None
    future_annotations: bool = False
    has_await: bool = False
    name_main: bool = False
    writes_files: set = field(default_factory=set)
    string_literals: set = field(default_factory=set)

    def __init__(self):
        # Literals, not the dataclass's default factories: one StatementFacts per statement,
        # and its two dozen containers were a tenth of the model's time (the benchmark).
        self.defs = {}
        self.dels = {}
        self.uses_now = {}
        self.uses_later = {}
        self.soft_uses = {}
        self.mutates = {}
        self.via = {}
        self.deep = set()
        self.own = set()
        self.bindings = []
        self.through = set()
        self.binds = {}
        self.stateless = {}
        self.values_after = None
        self.grad_writes = set()
        self.grad_names = set()
        self.calls = []
        self.called_now = set()
        self.launches = set()
        self.summaries = {}
        self.opaque = None
        self.opaque_later = None
        self.star_import = None
        self.future_annotations = False
        self.has_await = False
        self.name_main = False
        self.writes_files = set()
        self.string_literals = set()
        self.iterables = {}
        self.modules = set()
        self.iter_of = {}
