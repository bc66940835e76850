"""The target's signature -> command-line options, as argparse code.

Why one module and code text: `mpify run NB --fn train -- --lr 0.1` and the exported script's
`python train.py --lr 0.1` must accept exactly the same options. So the parameters are read once,
statically, from the target's `def` in the slice (no notebook code runs to print `--help`), and
turned into `parser.add_argument(...)` lines. The exported script's main() contains those lines;
`mpify run` executes the very same lines to build its parser.

Rules (a PyTorch user's expectations):
- every parameter is an option `--name` (`--batch-size` and `--batch_size` both work);
- the type comes from the annotation (int, float, str, bool, Path), else from the default's literal
  type, else a Python literal (`[1, 2]`, `None`) or plain text;
- `X | None` and `Optional[X]` take the word `None` too;
- `list[X]`, `List[X]`, `Sequence[X]` and `tuple[X, ...]` take several values: `--sizes 3 4`;
- bool parameters are `--flag/--no-flag`;
- a parameter without a default is a required option;
- defaults are never copied: an option left out is not passed, so the function's own default (which
  may be an expression like `lr=LR`) applies, in `mpify run` and in the script alike.
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import textwrap
from dataclasses import dataclass

from mpify.export.errors import ExportError, TargetArgsError

__all__ = ["Param", "target_params", "parser_code", "build_parser", "parse_target_args",
           "target_description", "target_is_async"]

_SIMPLE = {"int": "int", "float": "float", "str": "str", "bool": "bool", "Path": "path",
           "pathlib.Path": "path"}
# argparse `type=` for each kind ('bool' uses an action instead).
_TYPE_CODE = {"int": "int", "float": "float", "str": "str", "path": "pathlib.Path", "literal": "literal"}


@dataclass
class Param:
    """One parameter of the target as the command line sees it.

    kind: 'int', 'float', 'str', 'bool', 'path' or 'literal'. default_src: the default's source text
    (None: no default, a required option). annotation_src: the annotation's text, if any.
    """

    name: str
    kind: str
    default_src: str | None
    annotation_src: str | None = None
    many: str = ""  # "list" or "tuple": several values after the option (list[X], tuple[X, ...])
    optional: bool = False  # X | None: the word None gives None

    @property
    def required(self) -> bool:
        return self.default_src is None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _find_def(sl):
    """The AST node that defines the target in the slice (last definition wins), or None."""
    for item in reversed(sl.items):
        if sl.target not in item.defines:
            continue
        try:
            tree = ast.parse(textwrap.dedent(item.source))
        except SyntaxError:  # a column-cut `a = 1; def f(): ...` piece; no signature to read
            return None
        found = None
        for node in ast.walk(tree):  # also a def inside a top-level `if`/`try`
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == sl.target:
                found = node
            elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda)
                  and any(isinstance(t, ast.Name) and t.id == sl.target for t in node.targets)):
                found = node.value
        return found
    return None


_SEQUENCES = {"list", "List", "typing.List", "Sequence", "typing.Sequence", "collections.abc.Sequence",
              "tuple", "Tuple", "typing.Tuple"}


def _unwrap_optional(ann):
    """`X | None` / `Optional[X]` -> (X, True); anything else -> (ann, False)."""
    if isinstance(ann, ast.BinOp) and isinstance(ann.op, ast.BitOr):
        parts = [p for p in (ann.left, ann.right) if not (isinstance(p, ast.Constant) and p.value is None)]
        if len(parts) == 1:
            return parts[0], True
    elif isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in ("Optional", "typing.Optional"):
        return ann.slice, True
    return ann, False


def _element(ann):
    """`list[X]`, `Sequence[X]` -> (X, "list"); `tuple[X, ...]` -> (X, "tuple"); else (None, "")."""
    if not (isinstance(ann, ast.Subscript) and ast.unparse(ann.value) in _SEQUENCES):
        return None, ""
    container = "tuple" if ast.unparse(ann.value).split(".")[-1] in ("tuple", "Tuple") else "list"
    item = ann.slice
    if isinstance(item, ast.Tuple):  # only tuple[X, ...]: a fixed tuple[int, str] stays a literal
        if len(item.elts) == 2 and isinstance(item.elts[1], ast.Constant) and item.elts[1].value is Ellipsis:
            return item.elts[0], container
        return None, ""
    return item, container


def _parsed(ann):
    """A string annotation (`x: "list[int]"`, `list["int"]`) as the expression it spells; None
    when it does not parse. Any other annotation as it is."""
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        try:
            return ast.parse(ann.value, mode="eval").body
        except SyntaxError:
            return None
    return ann


def _simple(ann) -> str | None:
    ann = _parsed(ann)
    return None if ann is None else _SIMPLE.get(ast.unparse(ann))


def _kind(annotation, default) -> tuple[str, str, bool]:
    """(kind, many, optional) for one parameter."""
    if annotation is not None:
        ann = _parsed(annotation)
        if ann is None:
            return "literal", "", False
        ann, optional = _unwrap_optional(ann)
        element, container = _element(ann)
        if element is not None and _simple(element) not in (None, "bool"):
            return _simple(element), container, optional
        kind = _simple(ann)
        if kind is None:
            return "literal", "", False
        return kind, "", optional and kind != "bool"
    if default is not None:
        try:
            value = ast.literal_eval(default)
        except (ValueError, SyntaxError, TypeError):
            return "literal", "", False
        for t in (bool, int, float, str):  # bool first: True is an int too
            if type(value) is t:
                return t.__name__, "", False
    return "literal", "", False


def target_params(sl) -> list[Param] | None:
    """The target's parameters as options, or None when the slice gives no signature to read
    (the target is a variable or an import). Raises ExportError for positional-only parameters."""
    node = _find_def(sl)
    if node is None:
        return None
    if isinstance(node, ast.ClassDef):  # a class target: its __init__ without self
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return []
        a = init.args
        skip = 1
    else:
        a = node.args
        skip = 0
    if a.posonlyargs:
        names = ", ".join(p.arg for p in a.posonlyargs[skip:])
        if names:
            raise ExportError(f"`{sl.target}` has positional-only parameters ({names}), which "
                              "cannot be given as options; make them ordinary parameters")
    plain = a.posonlyargs + a.args
    defaults = [None] * (len(plain) - len(a.defaults)) + list(a.defaults)
    pairs = list(zip(plain, defaults))[skip:] + list(zip(a.kwonlyargs, a.kw_defaults))
    out = []
    for arg, default in pairs:
        ann = getattr(arg, "annotation", None)
        kind, many, optional = _kind(ann, default)
        out.append(Param(arg.arg, kind, None if default is None else ast.unparse(default),
                         None if ann is None else ast.unparse(ann), many, optional))
    return out


def _help(p: Param) -> str:
    what = p.annotation_src or p.kind
    text = f"{what} (required)" if p.required else f"{what} (default: {p.default_src})"
    return text.replace("%", "%%")  # argparse formats help with %


# Helpers the generated lines call, each written once when some parameter needs it:
# (needed by a parameter?, module it imports, source).
_HELPERS = [
    (lambda p: p.kind == "literal", "ast", """\
def literal(text):
    # A Python literal ([1, 2], None, {'a': 1}) where one parses, else the text.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
"""),
    (lambda p: p.optional, None, """\
def or_none(kind):
    # An `X | None` parameter: the word None gives None, anything else goes to X.
    def parse(text):
        return None if text == 'None' else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse
"""),
    (lambda p: bool(p.many), None, """\
class several(argparse.Action):
    # Several values after one option: a list, or a tuple for `tuple[X, ...]`;
    # the word None alone gives None where the parameter may be None.
    def __call__(self, parser, namespace, values, option_string=None):
        if values == [None]:
            values = None
        elif None in values:
            parser.error(f'argument {option_string}: None cannot be one of several values')
        else:
            values = tuple(values) if self.const == 'tuple' else list(values)
        setattr(namespace, self.dest, values)
"""),
]


def parser_code(params: list[Param]) -> tuple[list[str], list[str]]:
    """(imports, lines): the modules the lines need besides argparse, and the statements that add
    one option per parameter to a `parser` variable (plus the `literal` helper when needed)."""
    imports, lines = [], []
    for wanted, module, source in _HELPERS:
        if any(wanted(p) for p in params):
            imports += [module] if module else []
            lines += source.split("\n")  # the trailing newline leaves a blank line after it
    if any(p.kind == "path" for p in params):
        imports.append("pathlib")
    for p in params:
        names = [repr(p.option)]
        if "_" in p.name:
            names.append(repr("--" + p.name))
        parts = names + [f"dest={p.name!r}"]
        if p.kind == "bool":
            parts.append("action=argparse.BooleanOptionalAction")
        else:
            kind = _TYPE_CODE[p.kind]
            parts.append(f"type=or_none({kind})" if p.optional else f"type={kind}")
        if p.many:
            parts += ["nargs='+'" if p.required else "nargs='*'", "action=several", f"const={p.many!r}"]
        parts.append("required=True" if p.required else "default=argparse.SUPPRESS")
        parts.append(f"help={_help(p)!r}")
        lines.append(f"parser.add_argument({', '.join(parts)})")
    return imports, lines


class _Parser(argparse.ArgumentParser):
    target = "the target"

    def error(self, message):  # one line for `mpify run`, not argparse's usage + exit
        raise TargetArgsError(f"bad arguments for {self.target} (after --): {message}; "
                              "`-- --help` lists them")


def build_parser(params: list[Param], prog: str, description: str | None = None,
                 target: str | None = None) -> argparse.ArgumentParser:
    """The parser the exported script builds, built here by running the same generated lines."""
    parser = _Parser(prog=prog, description=description)
    if target:
        parser.target = f"`{target}`"
    _, lines = parser_code(params)
    ns = {"argparse": argparse, "ast": ast, "pathlib": pathlib, "parser": parser}
    exec(compile("\n".join(lines), "<mpify target options>", "exec"), ns)
    return parser


def parse_target_args(params: list[Param] | None, argv: list[str], prog: str,
                      description: str | None = None, target: str | None = None) -> dict:
    """Keyword arguments for the target from `argv` (what follows `--`). `--help` prints the
    options and raises SystemExit(0); a mismatch raises TargetArgsError (one line)."""
    if params is None:
        if argv:
            raise TargetArgsError(f"the parameters of `{target}` cannot be read from the notebook (it "
                                  "is not a def, class or lambda), so it takes no arguments after --")
        return {}
    return vars(build_parser(params, prog, description, target).parse_args(argv))


def target_description(sl) -> str | None:
    """The first line of the target's docstring (the parser's description)."""
    node = _find_def(sl)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        doc = ast.get_docstring(node)
        if doc:
            return doc.strip().splitlines()[0]
    return None


def target_is_async(sl) -> bool:
    """Is the target an `async def`? The script then runs it with asyncio.run."""
    return isinstance(_find_def(sl), ast.AsyncFunctionDef)
