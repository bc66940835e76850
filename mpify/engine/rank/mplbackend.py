"""The matplotlib backend of a child rank (displays.py sets it): `plt.show()` hands every open
figure to the caller as a PNG, then closes it, as the notebook's inline backend does in the kernel.

matplotlib loads a backend by module name (`module://mpify.engine.rank.mplbackend`), its documented way
of adding one: drawing is Agg's, only `show` is ours.
"""
from __future__ import annotations

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase, _Backend
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mpify.engine.rank import displays


@_Backend.export
class _BackendMpify(_Backend):
    FigureCanvas = FigureCanvasAgg
    FigureManager = FigureManagerBase

    @staticmethod
    def show(block=None) -> None:
        try:
            for manager in Gcf.get_all_fig_managers():
                displays.show_figure(manager.canvas.figure)
        finally:
            Gcf.destroy_all()
