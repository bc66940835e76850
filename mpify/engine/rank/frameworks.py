"""What training frameworks keep for the life of the process about a launch, put back when it ends.

Why this exists: the caller is rank 0 of every launch, so whatever a library keeps process-wide
about "the distributed job I am part of" outlives the launch in the caller, while the process
group it describes is destroyed with the launch (groups.py). The next launch then meets a
framework that believes it is still set up:

- accelerate keeps its state in Borg singletons (every `PartialState`, `AcceleratorState` and
  `GradientState` shares one class-level dict). Three launches in a row of a function using
  `Accelerator()` whose group accelerate itself created (no ctx): the second one's
  `Accelerator()` sees "initialised", never calls `init_process_group`, and `prepare` fails in
  rank 0 with `ValueError: Default process group has not been initialized`. Under TorchDDPCtx it
  runs, but with the first launch's num_processes and device, whatever the new launch's size.
  A notebook's own single-process `Accelerator()` made before a launch is the same trap the
  other way round: inside the launch, fn's `Accelerator()` would believe it is alone.
- Lightning writes this process's global rank into `rank_zero_only.rank` (its strategies' setup):
  in a caller that ran rank 1 (`caller_rank=1`) or a later node's rank, the notebook's own
  `rank_zero_*` messages would stay silent after the launch.
- torch.distributed itself: every `init_process_group` wraps `sys.excepthook` in one that prefixes
  each line of an uncaught exception with `[rankN]: `, and `destroy_process_group` never unwraps
  it. After 200 DDP launches a script's uncaught error printed each line behind 200 prefixes (a
  test saw it), and a deep enough chain would fail in the hook itself (the recursion limit).

- Lightning decides once, when `lightning.fabric.utilities.imports` is imported, whether the
  session is interactive (`_IS_INTERACTIVE`: `sys.ps1` or `python -i`), and other modules copy the
  answer. In an interactive session it refuses `Trainer(strategy="ddp")` and picks `ddp_fork` for
  `strategy="auto"`, because there its launcher would start the notebook again as a script. Under
  mpify the ranks exist before the Trainer does, as under torchrun: Lightning sees LOCAL_RANK and
  launches nothing (`creates_processes_externally`), so the check guards against nothing, yet it
  made rank 0 (the kernel) fail at once. Lightning has no setting for it, so for the length of the
  scope the flag reads False in every Lightning module that holds it, and in one imported during
  the scope (fixups.py); afterwards it reads what Lightning's import computes in this process.

So around ctx + fn in every rank (a launch's, a world's for its life, `child.rank_scope`):
- on entry, what such a framework holds from before is set aside and cleared, so fn's framework
  sets itself up from the launch's rank environment;
- on exit, success or failure, what the launch made is cleared with the framework's own API where
  it has one, and what was set aside comes back (the notebook's own `Accelerator()` keeps working).

A framework is touched only if the process has already imported it (sys.modules); none is ever
imported here. The HF `Trainer` keeps its state in accelerate's singletons (and resets them itself
when its TrainingArguments set up), so accelerate's entry covers it.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

_MISSING = object()

# Where Lightning computes `_IS_INTERACTIVE` (the unified package and the standalone one), and
# the packages whose modules copy it.
_LIGHTNING_FLAG = "_IS_INTERACTIVE"
_LIGHTNING_FLAG_HOMES = ("lightning.fabric.utilities.imports", "lightning_fabric.utilities.imports")
_LIGHTNING_PACKAGES = ("lightning.", "lightning_fabric.", "pytorch_lightning.")

# accelerate's singletons, each with its shared dict (`_shared_state`: a dict, or a per-thread
# one on TPU, read the same way through the class).
_ACCELERATE_STATES = ("PartialState", "AcceleratorState", "GradientState")
# The modules whose `rank_zero_only` function carries Lightning's process-wide rank: the unified
# package, the standalone ones, and lightning_utilities (the strategies set two of them at once).
_RANK_ZERO_MODULES = ("lightning_utilities.core.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning_fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                      "pytorch_lightning.utilities.rank_zero")


def _accelerate_classes() -> list:
    state = sys.modules.get("accelerate.state")
    if state is None:
        return []
    return [cls for name in _ACCELERATE_STATES if (cls := getattr(state, name, None)) is not None
            and isinstance(getattr(cls, "_shared_state", None), dict)]


def reset() -> None:
    """Forget the frameworks' state about this process's distributed job: accelerate's
    singletons, cleared with its own API (what transformers' TrainingArguments and
    accelerate's test utilities call); a class without it (an older release) is cleared directly."""
    for cls in _accelerate_classes():
        own = getattr(cls, "_reset_state", None)
        try:
            if cls.__name__ == "AcceleratorState" and own is not None:
                own(reset_partial_state=False)  # PartialState is its own entry in the loop
            elif own is not None:
                own()
            else:
                cls._shared_state.clear()
        except Exception:  # a release whose reset takes other arguments: the dict is the state
            cls._shared_state.clear()


def _rank_zero_functions() -> list:
    seen: dict[int, Any] = {}
    for name in _RANK_ZERO_MODULES:
        fn = getattr(sys.modules.get(name), "rank_zero_only", None)
        if fn is not None:
            seen[id(fn)] = fn
    return list(seen.values())


def _set_lightning_interactive(value: bool) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith(_LIGHTNING_PACKAGES) and _LIGHTNING_FLAG in getattr(module, "__dict__", {}):
            setattr(module, _LIGHTNING_FLAG, value)


def _not_interactive(module) -> None:
    setattr(module, _LIGHTNING_FLAG, False)


@contextmanager
def _lightning_not_interactive() -> Iterator[None]:
    """Lightning's interactive flag False for the block (see the module's docstring)."""
    from mpify.engine.rank import fixups

    _set_lightning_interactive(False)
    for home in _LIGHTNING_FLAG_HOMES:
        fixups.after_import(home, _not_interactive)
    try:
        yield
    finally:
        for home in _LIGHTNING_FLAG_HOMES:
            fixups.forget(home, _not_interactive)
        _set_lightning_interactive(hasattr(sys, "ps1") or bool(sys.flags.interactive))


class _SetAside:
    """What the frameworks held when the scope began."""

    def __init__(self) -> None:
        self.accelerate = {cls: dict(cls._shared_state) for cls in _accelerate_classes()}
        self.ranks = {id(fn): (fn, getattr(fn, "rank", _MISSING)) for fn in _rank_zero_functions()}
        self.excepthook = sys.excepthook

    def put_back(self) -> None:
        hook = sys.excepthook
        if (hook is not self.excepthook and getattr(hook, "__name__", "") == "_distributed_excepthook"
                and getattr(hook, "__module__", "").startswith("torch.distributed")):
            sys.excepthook = self.excepthook  # only torch's wrapper: a hook fn set on purpose stays
        for cls, state in self.accelerate.items():
            cls._shared_state.update(state)
        for fn, rank in self.ranks.values():
            if rank is _MISSING:
                fn.__dict__.pop("rank", None)
            else:
                fn.rank = rank


@contextmanager
def launch_state() -> Iterator[None]:
    """Around one rank's ctx + fn: frameworks start clean and end clean (see above)."""
    before = _SetAside()
    if before.accelerate:
        reset()
    try:
        with _lightning_not_interactive():
            yield
    finally:
        # A Lightning first imported during the launch keeps the rank it read then (RANK): with
        # the default caller_rank=0 on one node that is 0, what it would read outside a launch.
        reset()
        before.put_back()
