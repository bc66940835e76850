"""mpify: run a Python function on N ranked processes, the notebook kernel being rank 0.

    from mpify import ranch, import_star, TorchDDPCtx, torchddp_launch, World
    %load_ext mpify     # in a notebook: %mpify start 4 --ddp, then %%ranch cells

This module is the whole public surface.
"""
# Imported for their registration with the engine (the store host with rendezvous, the tensor
# codec with shm), whatever the caller goes on to use; neither imports torch until used.
from mpify import torch_codec, torch_store  # noqa: F401
from mpify.engine.errors import (LaunchBusyError, LaunchTimeoutError, MpifyError, RankDiedError,
                                 RankRaisedError, RemoteTraceback, ResultError, ShipError)
from mpify.engine.launch import ranch, shutdown
from mpify.engine.rendezvous import PortInUseError
from mpify.engine.world import World, WorldClosedError
from mpify.export import ExportError, run_notebook
from mpify.imports import import_star
from mpify.torch_ddp import TorchDDPCtx, in_torchddp, torchddp_launch

__version__ = "0.3.0"

__all__ = [
    "ranch", "import_star", "TorchDDPCtx", "torchddp_launch", "in_torchddp", "shutdown",
    "MpifyError", "RankRaisedError", "RankDiedError", "LaunchTimeoutError", "LaunchBusyError", "ShipError",
    "ResultError", "RemoteTraceback", "PortInUseError", "run_notebook", "ExportError", "World",
    "WorldClosedError", "load_ipython_extension",
]


def load_ipython_extension(ipython) -> None:
    """`%load_ext mpify`: the `%mpify` line magic and the `%%ranch` cell magic (a live world)."""
    from mpify.extension import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from mpify.extension import unload

    unload(ipython)
