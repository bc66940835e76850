"""A child rank's displays and figures, from its `display(obj)` or `plt.show()` to the caller.

Why this exists: a child rank has no IPython shell (plain.py), so IPython's `display(df)` there
prints the DataFrame's text and `plt.show()` prints `Figure(640x480)`, where a user comparing
per-rank losses or data shards would rather look. So in a child rank:

- IPython's `display` (however it was reached: `from IPython.display import display`, a cell's
  bare `display`, which dill ships as that same function, a `DisplayHandle`) is replaced by
  `display` below, which computes the object's rich representation with IPython's own
  formatters (no shell needed) and hands it to the caller;
- matplotlib's backend is mpify.engine.rank.mplbackend, whose `show()` hands each open figure
  over as a PNG (`plt.show()`, and `display(fig)`);
- `tqdm.notebook` (a widget no kernel would ever receive in a child) is tqdm's text bar, which
  the caller already shows live (output/bars.py).

Where it goes depends on the caller, decided once per launch or world (`mode`):
- "cell": the caller is a Jupyter kernel. The bundle travels as one line on the rank's stdout
  pipe, `MARK` + JSON + `END`, and the caller's forwarder (output/lines.py) shows it in the cell
  as a display output labelled with the rank. In-band, so that it keeps its place among the rank's
  printed lines, and needs no pipe of its own.
- "files": a terminal or a pipe (`mpify run`, a script). A figure is written as a PNG under
  `./mpify_figures/` (MPIFY_FIGURES sets another folder) and its path printed (`figure: ...`);
  any other object is printed as its text, as IPython does without a shell.
Rank 0 is the caller and displays as the caller does.
"""
from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

MARK = "\x1b]mpify-display;"  # an OSC-like opening no program prints by chance
END = "\x07"
FIGURES_VAR = "MPIFY_FIGURES"
_BACKEND = "module://mpify.engine.rank.mplbackend"
# MPLBACKEND values that mean "the notebook's inline plots" (ipykernel sets the first), which a
# child cannot show; any other backend the user chose is left alone.
_NOTEBOOK_BACKENDS = ("module://matplotlib_inline.backend_inline", "inline", "nbagg", "widget", "ipympl")

_mode = "files"
_figures = 0


def install(mode: str) -> None:
    """Make this child rank's displays and figures go to the caller (see the docstring)."""
    from mpify.engine.rank import fixups

    global _mode
    _mode = mode
    backend = os.environ.get("MPLBACKEND", "")
    if not backend or backend in _NOTEBOOK_BACKENDS:
        os.environ["MPLBACKEND"] = _BACKEND
        # Imported before (a forkserver's preload, the forked kernel): the backend it read from
        # the kernel's environment is switched, through matplotlib's own API.
        fixups.after_import("matplotlib", _use_backend)
    fixups.after_import("IPython.core.display_functions", _replace_display)
    fixups.after_import("IPython.display", _replace_display)
    fixups.after_import("tqdm.notebook", _text_bars)


def _use_backend(matplotlib) -> None:
    if matplotlib.get_backend() != _BACKEND:
        matplotlib.use(_BACKEND, force=True)


def _replace_display(module) -> None:
    module.display = display


def _text_bars(module) -> None:
    from tqdm.std import tqdm, trange

    module.tqdm = module.tqdm_notebook = tqdm
    module.trange = module.tnrange = trange


def display(*objs: Any, include=None, exclude=None, metadata=None, transient=None, display_id=None,
            raw: bool = False, clear: bool = False, update: bool = False, **kwargs: Any):
    """IPython's `display`, in a child rank: each object's representation goes to the caller.
    `clear` is ignored: a child rank clearing the cell would clear every rank's output."""
    if display_id is True:
        import uuid

        display_id = uuid.uuid4().hex
    for obj in objs:
        if raw:
            data, md = dict(obj), dict(metadata or {})
        else:
            data, md = represent(obj, include, exclude)
            md.update(metadata or {})
        send(data, md, str(display_id) if display_id is not None else None, update)
    if display_id is not None and not update:
        from IPython.display import DisplayHandle

        return DisplayHandle(display_id)
    return None


# What makes a value worth showing richly (IPython's formatter protocol); anything else is
# shown as its repr, with no import of IPython for it.
_RICH_REPRS = ("_repr_html_", "_repr_png_", "_repr_jpeg_", "_repr_svg_", "_repr_markdown_", "_repr_latex_",
               "_repr_mimebundle_")


def show_value(value: Any) -> None:
    """A world cell's last expression in a child rank, as a notebook shows a cell's value: rich
    where the value has a rich form and the caller is a cell, else its repr as a line."""
    if _mode == "cell" and (_is_figure(value) or any(hasattr(value, m) for m in _RICH_REPRS)):
        display(value)
    else:
        print(repr(value))


def represent(obj: Any, include=None, exclude=None) -> tuple[dict, dict]:
    """The object's mime bundle and metadata, by IPython's formatters; a matplotlib figure as PNG
    (IPython registers its figure formatter only in a shell)."""
    if _is_figure(obj):
        return {"image/png": figure_png(obj), "text/plain": repr(obj)}, {}
    from IPython.core.formatters import DisplayFormatter

    data, md = DisplayFormatter().format(obj, include=include, exclude=exclude)
    return dict(data), dict(md)


def _is_figure(obj: Any) -> bool:
    figure = getattr(sys.modules.get("matplotlib.figure"), "Figure", None)
    return figure is not None and isinstance(obj, figure)


def figure_png(figure) -> bytes:
    import io

    buf = io.BytesIO()
    figure.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def show_figure(figure) -> None:
    """One figure of `plt.show()`."""
    if _mode == "cell":
        send({"image/png": figure_png(figure), "text/plain": repr(figure)}, {}, None, False)
        return
    global _figures
    _figures += 1
    folder = os.environ.get(FIGURES_VAR) or "mpify_figures"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{os.environ.get('RANK', '?')}-pid{os.getpid()}-{_figures}.png")
    with open(path, "wb") as f:
        f.write(figure_png(figure))
    print(f"figure: {os.path.abspath(path)}", flush=True)


def send(data: dict, metadata: dict, display_id: str | None, update: bool) -> None:
    """Hand one bundle to the caller ("cell"), or print its text ("files")."""
    if _mode != "cell":
        if not update:
            print(data.get("text/plain", ""), flush=True)
        return
    wire = {k: (base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v) for k, v in data.items()}
    line = MARK + json.dumps({"data": wire, "metadata": metadata, "id": display_id, "update": update},
                             default=str) + END
    out = sys.stdout
    out.flush()  # what the rank printed before stays before
    out.write(line + "\n")
    out.flush()


def decode(text: str) -> dict | None:
    """The caller's side: a bundle from the text between MARK and END, or None if it is not one."""
    try:
        msg = json.loads(text)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and isinstance(msg.get("data"), dict) else None
