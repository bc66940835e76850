"""The visitor's calls: what `f(x)` and `recv.meth(x)` may change, by the effect model of effects.py.

Why a part of its own: a call is where the tables of effects.py are applied, and the answer depends
on what the callee is (a module, an imported object, a notebook function, a notebook value, a
builtin; the `kinds` of facts.py) and where the call is (made now, or in a function body, where
a notebook function's call is resolved later against its summary). This class is a part of
`visitor._Visitor`; its methods use that class's state and helpers (`_mutate`, `_kind`, ...).
"""
from __future__ import annotations

import ast
import builtins

from mpify.analysis.aliases import expr_sources, through_element
from mpify.analysis.effects import (GRAD_CALLS, GRAD_OBSERVERS, LAUNCHERS, OPAQUE_CALLS, PURE_BUILTINS,
                                    RECEIVER_MUTATORS, SEED_CALLS, WRITE_CALLS, changes_first_arg,
                                    external_method_changes_receiver, is_draw, is_inplace, is_query)
from mpify.analysis.facts import _EXTERNAL, BareCall
from mpify.analysis.scopes import dotted, root_name


class _CallVisits:
    """The call handlers of `visitor._Visitor`."""

    def visit_Call(self, node):
        func = node.func
        argnodes = list(node.args) + [k.value for k in node.keywords]
        if isinstance(func, ast.Name):
            name = func.id
            user = self._lookup(name) is not None or name in self.bound_now
            if self._kind(name) is None and (self._lookup(name) is not None or not hasattr(builtins, name)):
                self._observe(name)  # an object called (`model(xb)`): a module, its parameters
            if name in OPAQUE_CALLS and not user:
                self._opaque(f"calls {name}()")
            elif name == "setattr" and not user and len(node.args) >= 2:
                if isinstance(node.args[1], ast.Constant):
                    self._mutate(root_name(node.args[0]), "direct", node.lineno)
                else:
                    self._opaque("calls setattr() with a computed name")
            elif name in LAUNCHERS:
                self.f.launches.update(n.id for a in argnodes for n in ast.walk(a)
                                       if isinstance(n, ast.Name))
            elif name in PURE_BUILTINS and not user:
                pass
            elif self._lookup(name) is None and not self._later():
                self.f.called_now.add(name)
                pos = [root_name(a) for a in node.args]
                kws = {k.arg: root_name(k.value) for k in node.keywords if k.arg}
                self.f.calls.append(BareCall(name, pos, kws, node.lineno))
            elif self._kind(name) == "object" or (self._kind(name) == "module"):
                # In a function body, a function the notebook imports (`tensor(x)`, `F.relu` is
                # an attribute): only the listed ones change their argument.
                if changes_first_arg(name) and node.args:
                    self._mutate(root_name(node.args[0]), "direct", node.lineno)
            elif self._kind(name) is None and not (self._lookup(name) is None and hasattr(builtins, name)):
                # An object called in a function body (`model(xb)`, a parameter or a notebook
                # value): like a method call on it, it may change the object (a BatchNorm's
                # running stats), not its arguments (issue 11: `validate(model0)` read as
                # changing the `X` its body passes to `model`).
                self._mutate(name, "called", node.lineno)
            elif self._kind(name) == "notebook":
                # A notebook function, in a function body: what it changes is followed when the
                # function is called (summaries.py), with the function then defined under `name`.
                scope = next(s for s in reversed(self.stack) if s.kind == "function")
                pos = [self._value_refs(expr_sources(a, self._external)) for a in node.args
                       if not isinstance(a, ast.Starred)]
                kws = {k.arg: self._value_refs(expr_sources(k.value, self._external)) for k in node.keywords if k.arg}
                if any(isinstance(a, ast.Starred) for a in node.args) or any(
                        k.arg is None for k in node.keywords):
                    for a in argnodes:  # `f(*xs)`: which parameter gets what is unknown
                        self._mutate(root_name(a), "call-arg", node.lineno)
                else:
                    scope.calls.append((name, pos, kws))
            else:
                # A builtin that PURE_BUILTINS does not clear: it may change its arguments
                # (`next(it)` does change its first, see effects.ARG_MUTATORS).
                for i, a in enumerate(argnodes):
                    # (`next(it)` advances the iterator: what it shares, not what it iterates over,
                    # aliases.iteration_facts)
                    self._mutate(root_name(a), "direct" if i == 0 and changes_first_arg(name) else "call-arg",
                                 node.lineno, own=name == "next" and i == 0)
        elif isinstance(func, ast.Attribute):
            self._method_call(node, func, argnodes)
        if isinstance(func, ast.Name) and func.id == "open" and not self._later():
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                    and any(c in mode.value for c in "wax") and node.args
                    and isinstance(node.args[0], ast.Constant)):
                self.f.writes_files.add(node.args[0].value)
        self.visit(func)
        for a in argnodes:
            self.visit(a)

    def _method_call(self, node, func, argnodes):
        """`recv.meth(..)`: what it changes, by the effect model of effects.py."""
        recv = func.value
        root = root_name(recv)
        meth = func.attr
        chain = dotted(func)
        kind = self._kind(root)
        if meth in GRAD_OBSERVERS and kind is None:
            self._observe(root)
        if meth == "backward" and kind is None:
            # `loss.backward()`, `l.sum().backward()` change no value of `loss`: they write the
            # `.grad` of what it was computed from (aliases.py), so this is not a change of `loss`
            # or of what it shares.
            self._grad_writes_of(recv)
            return
        if meth in GRAD_CALLS and kind == "module" and chain and "autograd" in chain and node.args:
            self._grad_writes_of(node.args[0])  # `torch.autograd.backward(loss)`
        if isinstance(recv, ast.Call) and isinstance(recv.func, ast.Name) and recv.func.id == "get_ipython":
            self._opaque(f"uses get_ipython().{meth}")
        elif kind is not None:
            # A module, an imported object, or a notebook function or class: listed calls only.
            if meth in LAUNCHERS:
                self.f.launches.update(n.id for a in argnodes for n in ast.walk(a)
                                       if isinstance(n, ast.Name))
            elif external_method_changes_receiver(meth, chain, kind == "module" and recv is not None
                                                  and isinstance(recv, ast.Name)):
                self._mutate(root, "seed" if meth in SEED_CALLS else "state", node.lineno)
            elif is_draw(meth) and (self.faithful or self._later()):
                # `np.random.rand()` moves numpy's generator. In a function body always: the
                # function's summary says it draws (summaries.py), its calls decide.
                self._mutate(root, "draw", node.lineno)
            if meth == "import_module":
                self._opaque("imports a module by computed name")
        elif root is not None:
            inplace = any(k.arg == "inplace" and isinstance(k.value, ast.Constant) and k.value.value
                          for k in node.keywords)
            if meth in SEED_CALLS:
                self._mutate(root, "seed", node.lineno)  # `g.manual_seed(0)`: a new state
            elif is_draw(meth) and not inplace:
                # `rng.normal()` only moves the generator: left out unless faithful.
                if self.faithful or self._later():
                    self._mutate(root, "draw", node.lineno)
            elif not (is_query(meth) or meth in WRITE_CALLS) or inplace:
                # (`tok.save_pretrained(d)`, `df.to_csv(p)` write files; the object stays as it was.)
                # A method not known to change anything (`learn.fine_tune(1)`) changes the object,
                # not what it was built over (aliases.py: `dls` is not trained).
                self._mutate(root, "direct", node.lineno, deep=through_element(recv),
                             own=not (inplace or is_inplace(meth) or meth in RECEIVER_MUTATORS))
        elif isinstance(recv, ast.Call) and (is_inplace(meth) or meth in RECEIVER_MUTATORS or any(
                k.arg == "inplace" for k in node.keywords)):
            # `x.view(-1).add_(1)`, `torch.as_tensor(arr).zero_()`: the call's result may share what
            # it was made from (aliases.py), so changing it in place changes that. (Only the known
            # in-place changes: `is_3(x).float()` of a result is a conversion, not a change of x.)
            src = expr_sources(recv, self._external, derived=False)
            for n in src.share | src.elems | src.holds:
                if self._kind(n) not in _EXTERNAL:
                    self._mutate(n, "direct", node.lineno, deep=n in src.elems, through=True)
        if node.args and (changes_first_arg(meth) if kind is not None else meth == "shuffle"):
            # `random.shuffle(xs)`, `nn.init.zeros_(w)`, and on a generator object
            # `rng.shuffle(xs)`: the argument changes (`x.add_(y)` on a notebook object changes x).
            self._mutate(root_name(node.args[0]), "direct", node.lineno)
        if meth in WRITE_CALLS and not self._later():
            for a in argnodes + [recv]:
                for n in ast.walk(a):
                    if isinstance(n, ast.Constant) and isinstance(n.value, str):
                        self.f.writes_files.add(n.value)
