"""A child rank is a plain process, as torchrun would have started it, however it was started.

Why this exists: a rank forked from the caller (the zygote, start/zygote.py) or from a forkserver the
caller's kernel started is a copy of a Jupyter kernel in part: `sys.ps1` exists, IPython's
`InteractiveShell` singleton is the kernel's `ZMQInteractiveShell`, `get_ipython` sits in the
builtins (IPython puts it there while a cell runs), and libraries imported in the kernel made
their choices for a notebook. Libraries then act in the rank as if it were the notebook:

- `tqdm.auto` picks the widget bar, whose messages go to a kernel that is not there (ipykernel
  printed "attempted to send message from fork" about 200 times for a 3 s loop, and ranks 1 and 2
  of a 3-rank loop showed no frame at all);
- Lightning reads `sys.ps1` as "interactive" and refuses `Trainer(strategy="ddp")`;
- anything else that asks `get_ipython()` (HF's notebook progress, fastprogress) draws HTML
  for a frontend that never receives it.

So before anything of the user's runs, a child rank lets go of all of it: no `sys.ps1`/`ps2`, no
shell (`get_ipython()` returns None, as in a script), no shell builtins, no `ipykernel` among its
modules, and what tqdm's auto modules chose in the kernel is what they choose in a script. How a rank's own displays and figures still reach the
cell is displays.py's part; rank 0 is the caller itself and stays as it is.
"""
from __future__ import annotations

import builtins
import sys

# The kernel's own package, whose presence in sys.modules libraries read as "this is a notebook"
# (tqdm.autonotebook looks for `ipykernel.zmqshell`). A rank forked from the kernel lets go of its
# entries; the modules themselves stay alive where something still refers to them.
_KERNEL_PACKAGE = "ipykernel"


def become_plain() -> None:
    """Leave the kernel's interactive state behind (see the module's docstring)."""
    for name in ("ps1", "ps2"):
        if hasattr(sys, name):
            delattr(sys, name)
    _drop_shell()
    for name in [n for n in sys.modules if n == _KERNEL_PACKAGE or n.startswith(_KERNEL_PACKAGE + ".")]:
        del sys.modules[name]
    _console_tqdm()


def _console_tqdm() -> None:
    """tqdm.autonotebook and tqdm.auto chose the widget bar when the kernel imported them: what
    they give is what their import chooses outside a notebook (tqdm.std's bar, tqdm.asyncio's
    for tqdm.auto). Imported later in the rank, they choose so themselves."""
    auto_nb = sys.modules.get("tqdm.autonotebook")
    if auto_nb is not None and _chose_notebook(auto_nb):
        from tqdm.std import tqdm, trange

        auto_nb.tqdm, auto_nb.trange = tqdm, trange
    auto = sys.modules.get("tqdm.auto")
    if auto is not None and _chose_notebook(auto):
        from tqdm.asyncio import tqdm as asyncio_tqdm

        auto.tqdm = asyncio_tqdm  # its trange calls the module's tqdm


def _drop_shell() -> None:
    """Clear IPython's shell singleton and the builtins its builtin trap added (`get_ipython`,
    and `exit`/`quit` as the shell's own stand-ins). IPython is looked up, never imported: not
    imported means there is no shell to drop."""
    core = sys.modules.get("IPython.core.interactiveshell")
    shell_cls = getattr(core, "InteractiveShell", None)
    if shell_cls is None or not shell_cls.initialized():
        return
    shell = shell_cls.instance()
    trap = getattr(shell, "builtin_trap", None)
    if trap is not None:
        try:
            trap.deactivate()  # puts back what the trap replaced, removes what it added
        except Exception:  # not active (no cell was running): nothing of it to take out
            pass
    # What IPython's shell put in the builtins for good (`display`, `__IPYTHON__`, which some
    # libraries read as "in IPython") and its hooks: a process torchrun starts has none of them.
    for name in ("get_ipython", "display", "__IPYTHON__"):
        builtins.__dict__.pop(name, None)
    for hook in ("displayhook", "excepthook"):
        # an instance's __module__ is its class's; a bound method's, its function's
        if (getattr(getattr(sys, hook), "__module__", None) or "").startswith(("IPython.", "ipykernel.")):
            setattr(sys, hook, getattr(sys, f"__{hook}__"))
    # Every class from the shell's own type up holds the instance (traitlets' singletons):
    # clearing from InteractiveShell alone would leave ZMQInteractiveShell._instance set.
    type(shell).clear_instance()


def _chose_notebook(module) -> bool:
    cls = getattr(module, "tqdm", None)
    return any(base.__module__ == "tqdm.notebook" for base in getattr(cls, "__mro__", ()))
