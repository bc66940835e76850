"""Inside a rank: what every rank runs in its own process, the caller's rank (rank 0) included.

- child.py: `run_rank` (ctx + fn, in a child and in the caller alike) and a child's life around
  it (`rank_main`: its process group, the watchdog on the caller, output into the caller's pipes);
- groups.py: process groups belong to the launch, whoever created them;
- frameworks.py: what accelerate, Lightning and torch keep process-wide, put back after a launch;
- plain.py: a child rank is a plain process, as torchrun starts one, however it was started;
- fixups.py: fix a module right after it is imported (what plain.py and frameworks.py apply);
- displays.py, mplbackend.py: a child rank's `display(obj)` and `plt.show()`, sent to the caller.

How ranks are started is start/'s; what the caller does with their output, output/'s.
"""
